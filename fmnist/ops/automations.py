"""The pipeline's Prefect automations (`automations.yaml`) and the operator's webhook, applied idempotently.

Prefect creates automations but never upserts them, so applying matches by name: an automation of
the file that exists is updated in place (duplicates left by earlier tools are deleted), a missing
one is created, and one named with the pipeline's prefix that the file no longer has is deleted.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PREFIX = "fashion-mnist: "
WEBHOOK_BLOCK = "fashion-mnist-operator"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
NOTIFY_BLOCK = "notify_block_id"
RETRAIN_DEPLOYMENT = "retrain_deployment_id"
# What an automation may wait for: without it, the automation is left out (and apply says why).
OPTIONAL = {
    NOTIFY_BLOCK: f"no webhook block {WEBHOOK_BLOCK!r}: make webhook WEBHOOK_URL=...",
    RETRAIN_DEPLOYMENT: "no deployment to retrain on drift: make deploy RETRAIN_ON_DRIFT=retrain-fashion-mnist/adhoc",
}
# Flow-run heartbeats: Prefect's minimum interval, and a day (a crash found later than three days is no help).
MIN_HEARTBEAT_S = 30
MAX_HEARTBEAT_S = 86_400
# A run handed to a worker (Pending) that has not started (Running) this long after is marked Crashed.
# Generous: a cluster host's first run installs TensorFlow (3.5 GB with CUDA) before it starts; runs
# here start 7-10 s after they are handed over.
START_WINDOW_S = 1800
MIN_START_WINDOW_S = 10
MAX_WEBHOOK_URL_CHARS = 2048


class AutomationsError(ValueError):
    """The automations file is unusable; the message names the automation and the problem."""


@dataclass
class Applied:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name: why (what it waits for is not configured)


def fill(value: Any, values: dict[str, Any]) -> Any:
    """`value` with each `${name}` replaced; a string that is one placeholder takes the value's type."""
    if isinstance(value, dict):
        return {key: fill(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [fill(item, values) for item in value]
    if not isinstance(value, str):
        return value
    if (whole := PLACEHOLDER.fullmatch(value)) is not None:
        return values[whole.group(1)]
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), value)


def placeholders(value: Any) -> set[str]:
    return set(PLACEHOLDER.findall(yaml.safe_dump(value)))


def load(path: Path, values: dict[str, Any]) -> tuple[list, dict[str, str]]:
    """The file's automations, filled in and validated, and those left out (a value in OPTIONAL not given),
    each with why."""
    from prefect.events.schemas.automations import AutomationCore
    from pydantic import ValidationError

    specs = (yaml.safe_load(path.read_text()) or {}).get("automations") or []
    automations, skipped = [], {}
    for spec in specs:
        name = spec.get("name", "")
        if not name.startswith(PREFIX):
            raise AutomationsError(f"{path}: {name!r}: the pipeline's automations are named {PREFIX!r}...")
        missing = placeholders(spec) - values.keys()
        if missing and missing <= OPTIONAL.keys():
            skipped[name] = "; ".join(OPTIONAL[m] for m in sorted(missing))
            continue
        if missing:
            raise AutomationsError(f"{path}: {name!r}: no value for {', '.join(sorted(missing))}")
        try:
            automations.append(AutomationCore.model_validate(fill(spec, values)))
        except ValidationError as exc:
            raise AutomationsError(f"{path}: {name!r}: {exc}") from None
    return automations, skipped


def webhook_block_id() -> str | None:
    """The id of the operator's webhook block, if one was configured (`configure_webhook`)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    try:
        return str(CustomWebhookNotificationBlock.load(WEBHOOK_BLOCK)._block_document_id)
    except ValueError:  # no such block
        return None


def deployment_id(name: str) -> str:
    """The id of deployment `name` ('flow/deployment'); an error naming it if there is none."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return str(client.read_deployment_by_name(name).id)
        except ObjectNotFound:
            raise AutomationsError(f"no deployment {name!r} on the server: make deploy first") from None


def checked_webhook_url(url: str) -> str:
    """`url`, if notifications can be POSTed to it: http(s), a host name or an IP address, a valid port, no
    spaces or control characters. Saved as it was typed, a wrong one failed only at the first notification,
    which nobody saw. The errors never repeat the URL, nor Python's messages about it: a webhook's URL
    often holds its token, or a user and password."""
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        raise ValueError(f"a webhook URL of {len(url):,} characters: at most {MAX_WEBHOOK_URL_CHARS:,}")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError("the webhook URL holds spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:  # urllib's (a malformed IPv6 address, a port that is no number): they quote the URL
        raise ValueError("the webhook URL is malformed (its host or port)") from None
    if scheme not in ("http", "https"):
        raise ValueError("the webhook URL must start with http:// or https://")
    if not host or port == 0 or not _host_name_or_address(host):
        raise ValueError("the webhook URL names no host a request could reach, or port 0")
    return url


HOST_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _host_name_or_address(host: str) -> bool:
    """Whether `host` (as urllib gives it: lower case, no brackets) is an IP address, or a DNS name whose
    labels (after IDNA, for names in other scripts) are letters, digits, hyphens and underscores."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # (an IPv6 zone, fe80::1%eth0, is the host's to resolve)
        return True
    except ValueError:
        pass
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return len(name) <= 253 and all(HOST_LABEL.fullmatch(label) for label in name.removesuffix(".").split("."))


def configure_webhook(url: str) -> str:
    """Create or replace the webhook block the notifications use: one JSON POST with subject and body."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name="Fashion-MNIST operator",
        url=checked_webhook_url(url),
        method="POST",
        json_data={"subject": "{{subject}}", "text": "{{body}}"},
    )
    return str(block.save(WEBHOOK_BLOCK, overwrite=True))


def apply(
    path: Path, heartbeat_s: int, start_window_s: int = START_WINDOW_S, retrain_on_drift: str | None = None
) -> Applied:
    """Create or update the file's automations on the Prefect server PREFECT_API_URL names.
    `retrain_on_drift`: the deployment ('flow/deployment') a drifted champion starts, if any."""
    from prefect.client.orchestration import get_client

    if not MIN_HEARTBEAT_S <= heartbeat_s <= MAX_HEARTBEAT_S:
        raise ValueError(f"heartbeat every {heartbeat_s} s: give {MIN_HEARTBEAT_S} to {MAX_HEARTBEAT_S} s")
    if not MIN_START_WINDOW_S <= start_window_s <= MAX_HEARTBEAT_S:
        raise ValueError(f"a start window of {start_window_s} s: give {MIN_START_WINDOW_S} to {MAX_HEARTBEAT_S} s")

    values: dict[str, Any] = {"heartbeat_window_s": 3 * heartbeat_s, "start_window_s": start_window_s}
    if block_id := webhook_block_id():
        values[NOTIFY_BLOCK] = block_id
    if retrain_on_drift:
        values[RETRAIN_DEPLOYMENT] = deployment_id(retrain_on_drift)
    automations, skipped = load(path, values)
    applied = Applied(skipped=skipped)
    wanted = {a.name for a in automations}
    with get_client(sync_client=True) as client:
        existing: dict[str, list] = {}
        for found in client.read_automations():
            existing.setdefault(found.name, []).append(found)
        for automation in automations:
            current = existing.pop(automation.name, [])
            if current:
                client.update_automation(current[0].id, automation)
                applied.updated.append(automation.name)
            else:
                client.create_automation(automation)
                applied.created.append(automation.name)
            for duplicate in current[1:]:
                client.delete_automation(duplicate.id)
                applied.deleted.append(duplicate.name)
        for name, stale in existing.items():
            if name.startswith(PREFIX) and name not in wanted:
                for automation in stale:
                    client.delete_automation(automation.id)
                    applied.deleted.append(name)
    return applied
