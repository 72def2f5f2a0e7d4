"""What runs the stages: the stage runner (params first, one-line user errors), MLflow tracking, and
working copies of a project."""
