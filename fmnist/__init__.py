"""The pipeline's plain code, one package per stage, each importing only the ones before it:

`storage` (where things live) <- `data` (download, incoming, validate, normalize) <- `training` <-
`evaluation` <- `registry` (register, prune) <- `serving` <- `ops` (command line, events, automations).

Nothing here imports `tasks/` or `flows/` (`tests/test_layering.py` holds both rules), so every piece is
tested with plain calls.
"""
