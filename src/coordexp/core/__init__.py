"""The shared core every stage uses: codec, contract, geometry, coord vocabulary, conversation template,
config schema, checkpoint folders, paths, atomic I/O and the user-facing errors. Imports no stage."""
