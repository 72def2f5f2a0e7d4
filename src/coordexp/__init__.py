"""CoordExp workbench: Stage-1 training of coordinate-token vision-language detectors.

Importing the package forbids hub downloads for the whole process: every model, tokenizer and
data set must come from a local path, and code that would download fails instead.
"""

import os as _os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    _os.environ.setdefault(_var, "1")
_os.environ.setdefault("MODELSCOPE_OFFLINE", "1")

__version__ = "0.1.0"
