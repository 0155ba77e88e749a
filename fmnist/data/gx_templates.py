"""GX's Data Docs templates, compiled once per process instead of at every build.

GX renders Data Docs through a new `DefaultJinjaView` for each page kind, each with a new jinja2
`Environment`, so every `build_data_docs` lexed, parsed and compiled its fifty-odd templates again:
0.12 of the 0.18 CPU-s a one-suite validation took, and most of a test run's validation time. A bytecode
cache shared by those environments keeps each compiled template (jinja2 keys it by the template's name
and a checksum of its source, so a changed template is compiled again); the pages are unchanged.
"""

from __future__ import annotations

from functools import cache

import jinja2
from jinja2.bccache import Bucket


class CompiledTemplates(jinja2.BytecodeCache):
    """jinja2's bytecode cache in this process's memory."""

    def __init__(self) -> None:
        self.compiled: dict[str, bytes] = {}

    def load_bytecode(self, bucket: Bucket) -> None:
        if (code := self.compiled.get(bucket.key)) is not None:
            bucket.bytecode_from_string(code)

    def dump_bytecode(self, bucket: Bucket) -> None:
        self.compiled[bucket.key] = bucket.bytecode_to_string()


@cache
def share_compiled_templates() -> CompiledTemplates:
    """Give every GX view made from now on in this process one `CompiledTemplates` (once; returns it).

    GX offers no setting for its views' environments, so the view's constructor is wrapped to set the
    environment's cache after GX made it (jinja2 reads `Environment.bytecode_cache` at each template load).
    """
    from great_expectations.render.view.view import DefaultJinjaView

    compiled = CompiledTemplates()
    make_view = DefaultJinjaView.__init__

    def make_view_sharing_templates(view: DefaultJinjaView, *args, **kwargs) -> None:
        make_view(view, *args, **kwargs)
        view.env.bytecode_cache = compiled

    DefaultJinjaView.__init__ = make_view_sharing_templates
    return compiled
