"""mkdocs hooks: the reference pages, generated from the code at every build, and `{{ fmnist.X.NAME }}`
in any page replaced by that constant's value, so no page restates a number the code owns.

A name that does not resolve fails the build (`make docs` builds with --strict), and so does a code name in
a page or in the README that the code no longer has (`code_names.py`, beside this file).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import typing
from pathlib import Path
from typing import Any

from code_names import Code, findings  # beside this file: mkdocs puts docs/ on the path while it loads hooks
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File
from pydantic import BaseModel
from pydantic.fields import FieldInfo

CODE_VALUE = re.compile(r"\{\{\s*((?:fmnist|flows)\.[\w.]+)(:MiB)?\s*\}\}")  # `:MiB`: bytes, in MiB

# The limits an operator meets: (module, constant, what it bounds, unit).
LIMITS = [
    ("fmnist.data.idx", "MAX_IDX_BYTES", "An IDX file, decompressed", "bytes"),
    ("fmnist.data.incoming", "MAX_BATCH_ROWS", "Images in one incoming batch", "images"),
    ("fmnist.data.incoming", "MAX_BATCH_BYTES", "A batch in a bucket (downloaded whole first)", "bytes"),
    ("fmnist.data.incoming", "MAX_BATCH_FILES", "Files in one incoming batch", "files"),
    ("fmnist.data.incoming", "QUARANTINE_ATTEMPTS", "Quarantine names tried in one second", "names"),
    ("fmnist.data.png", "MAX_PNG_BYTES", "One PNG file (add-batch, predict, serve)", "bytes"),
    ("fmnist.data.png", "MAX_PNG_PIXELS", "Pixels of one PNG before it is decoded", "pixels"),
    ("fmnist.data.drift", "MIN_ROWS", "Images a batch needs to be judged for drift alone", "images"),
    ("fmnist.data.drift", "KL_THRESHOLD", "KL divergence above which a feature has drifted", ""),
    ("fmnist.data.contract", "MAX_SAMPLE_ROWS", "Failing rows shown per expectation", "rows"),
    ("fmnist.registry.versions", "CLAIM_ATTEMPTS", "Version numbers one registration tries", "numbers"),
    ("fmnist.registry.versions", "CHAMPION_MOVE_ATTEMPTS", "Reads of a changing champion pointer", "reads"),
    ("fmnist.registry.versions", "FINGERPRINT_SCAN", "Versions searched for a run of the same inputs", "versions"),
    ("fmnist.training.supervision", "CRASH_RESUBMISSIONS", "Times a crashed training run is started again", "runs"),
    ("fmnist.storage.s3", "S3_ATTEMPTS", "Attempts of one object-store request", "attempts"),
    ("fmnist.storage.scratch", "SCRATCH_KEPT_S", "A scratch copy unused for this long is deleted", "seconds"),
    ("fmnist.serving.payloads", "MAX_INSTANCES", "Images in one predict request (REST or gRPC)", "images"),
    ("fmnist.serving.models", "MAX_BATCH", "Images in one model call, across requests", "images"),
    ("fmnist.serving.payloads", "MAX_FILES", "PNG uploads in one request", "files"),
    ("fmnist.serving.rest", "MAX_JSON_BYTES", "A JSON request body", "bytes"),
    ("fmnist.serving.payloads", "MAX_UPLOAD_BYTES", "A multipart upload", "bytes"),
    ("fmnist.serving.workers", "INLINE_BYTES", "A body parsed on the event loop; bigger ones in workers", "bytes"),
    ("fmnist.serving.grpc_messages", "MAX_MESSAGE_BYTES", "A gRPC message", "bytes"),
    ("fmnist.serving.grpc_api", "MAX_STREAMS_PER_CONNECTION", "gRPC calls at once on one connection", "streams"),
    ("fmnist.serving.options", "MAX_CONNECTIONS", "Requests and connections at once (more get a 503)", "connections"),
    ("fmnist.serving.options", "HEADER_S", "A request's head, from its first byte (then a 408)", "seconds"),
    ("fmnist.serving.options", "BODY_S", "A request's body, from its head (then a 408)", "seconds"),
    ("fmnist.serving.options", "MAX_BODY_BYTES_IN_FLIGHT", "Request bodies held at once (more get a 429)", "bytes"),
    ("fmnist.serving.options", "IDLE_S", "A gRPC connection with no call open", "seconds"),
    ("fmnist.serving.options", "CONNECTION_AGE_S", "A gRPC connection, before it is asked to go away", "seconds"),
    ("fmnist.serving.edge", "MAX_BODY_BYTES", "A REST body at the edge (nginx)", "bytes"),
    ("fmnist.serving.edge", "BODY_BUFFER_BYTES", "A body the edge holds in memory (bigger ones in a file)", "bytes"),
    ("fmnist.serving.log_limits", "PER_WINDOW", "Log lines of one kind a minute (more are counted)", "lines"),
    ("fmnist.serving.service", "MAX_SHADOW_CALLS", "Shadow calls to the canary in flight (more are skipped)", "calls"),
    ("fmnist.serving.service", "SHADOW_STOP_S", "A stopping server's wait for shadow calls in flight", "seconds"),
    ("fmnist.serving.capture", "MAX_QUEUED", "Captured records waiting to be written (more are dropped)", "records"),
    ("fmnist.serving.capture", "MAX_RECORDS", "Captured records kept (then capture pauses until a review)", "records"),
    ("fmnist.serving.capture", "MAX_FILES", "Captured record files kept (then capture pauses until a review)", "files"),
    ("fmnist.serving.evidence", "MAX_HELD_WINDOWS", "Evidence windows held while the store fails", "windows"),
    ("fmnist.evaluation.evidence", "MAX_WINDOWS", "Evidence windows read at once (the newest)", "windows"),
    ("fmnist.data.feedback", "MAX_REVIEW", "Images in one review folder", "images"),
    ("fmnist.registry.labels", "MAX_LABELS", "Labels besides stable (each a model in memory)", "labels"),
    ("fmnist.registry.rollout", "STATUS_ROLLOUTS", "Rollouts `rollout status` reads, newest first", "rollouts"),
    ("fmnist.registry.rollout", "ROLLOUT_SCAN", "Rollouts searched for rolled-back versions", "rollouts"),
    ("fmnist.registry.rollout", "MAX_REASON_CHARS", "A rollout decision's reason", "characters"),
    ("fmnist.registry.rollout", "MAX_EVIDENCE_BYTES", "A rollout decision's evidence summary, as JSON", "bytes"),
    ("fmnist.ops.events", "MAX_MESSAGE_CHARS", "An event's message", "characters"),
    ("fmnist.ops.automations", "MIN_HEARTBEAT_S", "Shortest flow-run heartbeat interval", "seconds"),
    ("fmnist.ops.automations", "MAX_HEARTBEAT_S", "Longest flow-run heartbeat interval", "seconds"),
    ("fmnist.ops.automations", "START_WINDOW_S", "A run handed to a worker, until it must have started", "seconds"),
]
NOT_EXPANDED = {"dataset"}  # the pinned files' names, sizes and hashes: a record, not knobs
GENERATED = "<!-- Generated from the code by docs/hooks.py at every build: edit the code, not this page. -->\n\n"


def code_value(dotted: str) -> Any:
    """The value of `package.module.NAME` (attributes may follow: `...Model.model_fields`)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            value = getattr(value, attribute)
        return value
    raise ValueError(f"{dotted}: no such module")


def shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def with_unit(value: Any, unit: str) -> str:
    text = f"{shown(value)} {unit}".strip()
    if unit == "bytes" and value >= 1 << 20:
        text += f" ({value / (1 << 20):g} MiB)"
    if unit == "seconds" and value >= 86400:
        text += f" ({value / 86400:g} days)"
    return text


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def bounds(info: FieldInfo) -> str:
    found = []
    for item in info.metadata:
        for attribute, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"), ("min_length", "length ≥")):
            if (limit := getattr(item, attribute, None)) is not None:
                found.append(f"{sign} {shown(limit)}")
    return ", ".join(found)


def type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " / ".join(f"`{a}`" for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def default_of(info: FieldInfo, expanded: bool) -> str:
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return "(its fields below)" if expanded else f"`{type(value).__name__}` as pinned in the code"
    if isinstance(value, list):
        return "<br>".join(f"`{v}`" for v in value)
    return "(required)" if info.is_required() else f"`{shown(value)}`"


def model_table(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One row per field of `model` (nested models' fields follow, dotted), from the fields' own metadata."""
    rows, nested = [], []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        expand = isinstance(annotation, type) and issubclass(annotation, BaseModel) and name not in NOT_EXPANDED
        rows.append(
            f"| `{prefix}{name}` | {type_name(annotation)} | {default_of(info, expand)} | {bounds(info)} "
            f"| {cell(info.description or '')} |"
        )
        if expand:
            nested.append((annotation, f"{prefix}{name}."))
    for sub, sub_prefix in nested:
        rows += model_table(sub, sub_prefix)
    return rows


def parameters_page() -> str:
    from flows.params import RetrainParams
    from fmnist.evaluation.monitor import MonitorParams
    from fmnist.registry.judge import JudgeParams
    from fmnist.storage.layout import StorageParams

    header = ["| parameter | type | default | bounds | meaning |", "| --- | --- | --- | --- | --- |"]
    return "\n".join(
        [
            "# Flow parameters",
            "",
            GENERATED.strip(),
            "",
            "The retraining flow takes `params` (what to train) and `storage` (where things live), two forms in",
            "the Prefect UI. Every field is checked: an unknown one, or a value out of bounds, is refused before",
            "the run starts. The training presets fill the knobs they own ([presets](presets.md)).",
            "",
            "## `params` (`flows.params.RetrainParams`)",
            "",
            *header,
            *model_table(RetrainParams),
            "",
            "## `storage` (`fmnist.storage.layout.StorageParams`)",
            "",
            *header,
            *model_table(StorageParams),
            "",
            "## The rollout judge's `judge` (`fmnist.registry.judge.JudgeParams`)",
            "",
            "The `judge-rollout` flow's rule ([after the gate](../rollout.md)); it also takes `storage`.",
            "",
            *header,
            *model_table(JudgeParams),
            "",
            "## The champion's watch's `watch` (`fmnist.evaluation.monitor.MonitorParams`)",
            "",
            "The `watch-champion` flow's periods and thresholds; it also takes `storage`.",
            "",
            *header,
            *model_table(MonitorParams),
            "",
        ]
    )


def presets_page() -> str:
    from fmnist.training.model import RECIPES, TrainParams

    knobs = sorted({knob for recipe in RECIPES.values() for knob in recipe})
    presets = typing.get_args(TrainParams.model_fields["preset"].annotation)
    lines = [
        "# Training presets",
        "",
        GENERATED.strip(),
        "",
        cell(TrainParams.model_fields["preset"].description or ""),
        "",
        "Each preset's value of the knobs a recipe sets (`fmnist.training.model.RECIPES`); a knob given in",
        "the parameters wins over the recipe.",
        "",
        "| knob | " + " | ".join(f"`{p}`" for p in presets) + " |",
        "| --- |" + " ---: |" * len(presets),
    ]
    for knob in knobs:
        values = [getattr(TrainParams(preset=p), knob) for p in presets]
        lines.append(f"| `{knob}` | " + " | ".join(f"`{shown(v)}`" for v in values) + " |")
    return "\n".join(lines) + "\n"


def cli_page() -> str:
    from fmnist.ops.cli import parser

    os.environ["COLUMNS"] = "100"  # the same line breaks on every machine
    main = parser()
    lines = ["# Command line: `fashion-mnist`", "", GENERATED.strip(), "", "```text", main.format_help(), "```", ""]
    commands = next(a for a in main._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        lines += [f"## `fashion-mnist {name}`", "", "```text", sub.format_help(), "```", ""]
    return "\n".join(lines)


def limits_page() -> str:
    lines = [
        "# Limits",
        "",
        GENERATED.strip(),
        "",
        "What the pipeline and the server accept at most; anything beyond is refused with an error that names",
        "the file, the request or the limit.",
        "",
        "| limit | value | constant |",
        "| --- | ---: | --- |",
    ]
    for module, name, what, unit in LIMITS:
        lines.append(f"| {what} | {with_unit(code_value(f'{module}.{name}'), unit)} | `{module}.{name}` |")
    return "\n".join(lines) + "\n"


def events_page() -> str:
    from fmnist.ops import events

    constants = [(value, name) for name, value in vars(events).items() if name.isupper() and isinstance(value, str)]
    names = sorted((value, name) for value, name in constants if value.startswith(f"{events.PREFIX}."))
    lines = [
        "# Events",
        "",
        GENERATED.strip(),
        "",
        "The pipeline's own Prefect events (`fmnist.ops.events`); the [runbook](../operations.md#runbook) says",
        "what each means and what to do.",
        "",
        "| event | constant |",
        "| --- | --- |",
        *[f"| `{value}` | `fmnist.ops.events.{name}` |" for value, name in names],
    ]
    return "\n".join(lines) + "\n"


def edge_page() -> str:
    from fmnist.serving.edge import EdgeAddresses, EdgeLimits, nginx_config

    addresses = EdgeAddresses("0.0.0.0", 8501, 8500, "127.0.0.1:18501", "127.0.0.1:18500")
    config = nginx_config(addresses, Path("/run/fmnist-edge"), EdgeLimits())
    lines = [
        "# The edge's nginx configuration",
        "",
        GENERATED.strip(),
        "",
        "What `fashion-mnist serve --edge` (and `make serve`) runs, with the default limits, the edge on every",
        "address and the server behind it on loopback ports 18501 (REST) and 18500 (gRPC). "
        "`fashion-mnist serve --print-edge-config` prints it for your own options; "
        "[Serving](../serving.md#the-edge) says what each limit is for and how it maps onto an ingress.",
        "",
        "```nginx",
        config.rstrip(),
        "```",
    ]
    return "\n".join(lines) + "\n"


PAGES = {
    "reference/parameters.md": parameters_page,
    "reference/presets.md": presets_page,
    "reference/cli.md": cli_page,
    "reference/limits.md": limits_page,
    "reference/events.md": events_page,
    "reference/edge.md": edge_page,
}


def on_config(config):
    # `make docs` builds --strict --quiet, and --quiet drops warnings before --strict counts them, so a broken
    # link or anchor passed. Warnings are kept (and shown): --strict fails on them, as it says.
    mkdocs_log = logging.getLogger("mkdocs")
    mkdocs_log.setLevel(min(mkdocs_log.level, logging.WARNING))
    return config


def on_files(files, config):
    for path, page in PAGES.items():
        files.append(File.generated(config, path, content=page()))
    check_code_names(files, Path(config.config_file_path).parent)
    return files


def check_code_names(files, root: Path) -> None:
    """Fail the build on every code name the pages (generated ones too) or the README give that the code no
    longer has, all of them in one error."""
    code = Code.of(root)
    pages = [("README.md", (root / "README.md").read_text())]  # outside docs_dir: no page hook sees it
    pages += [(f"docs/{page.src_uri}", page.content_string) for page in files.documentation_pages()]
    found = [finding for name, markdown in pages for finding in findings(markdown, name, code)]
    if found:
        raise PluginError("Code names the code does not have:\n" + "\n".join(map(str, found)))


def on_page_markdown(markdown: str, page, config, files) -> str:
    def value(match: re.Match) -> str:
        try:
            found = code_value(match.group(1))
            return f"{found / (1 << 20):g} MiB" if match.group(2) else shown(found)
        except (AttributeError, ValueError, ImportError) as exc:
            raise ValueError(f"{page.file.src_uri}: {match.group(0)} names nothing in the code ({exc})") from None

    rendered = CODE_VALUE.sub(value, markdown)
    if leftover := re.search(r"\{\{\s*(?:fmnist|flows)\.[^}]*\}\}", rendered):  # an expression, not a name
        raise ValueError(f"{page.file.src_uri}: {leftover.group(0)} is not a code name the docs can show")
    return rendered
