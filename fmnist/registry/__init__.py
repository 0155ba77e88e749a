"""The register and prune stages' plain code: versions, the champion pointer, manifests and
retention of run folders."""
