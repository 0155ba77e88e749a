"""The rollout judge's and the champion monitor's reports in the Prefect UI: what was decided and on what
evidence, and the figures over time (a table the UI renders, one row a period)."""

from __future__ import annotations

from datetime import UTC, datetime

from fmnist.evaluation.monitor import MonitorReport
from fmnist.registry.judging import Judgement


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


def _share(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def judgement_markdown(judgement: Judgement) -> str:
    verdict = judgement.verdict
    if verdict is None:
        return f"# No rollout in progress\n\nChampion: **{judgement.champion or 'none'}**."
    titles = {"promote": "promoted", "roll_back": "rolled back", "wait": "still in its canary rollout"}
    rows = "\n".join(
        f"| {c.name} | {c.status} | {_share(c.canary)} | {_share(c.reference)} | {c.detail} |" for c in verdict.checks
    )
    skipped = (
        f"\n\n**Evidence files skipped** ({len(judgement.skipped)}): " + "; ".join(judgement.skipped[:5])
        if judgement.skipped
        else ""
    )
    return f"""# {judgement.version} {titles[verdict.action]}

**Verdict**: {verdict.reason}. Champion now: **{judgement.champion or "none"}**.
{verdict.canary_images:,} live images answered by the canary in {verdict.elapsed_s / 3600:.1f} h.

| check | status | canary | held against | detail |
| --- | --- | ---: | ---: | --- |
{rows}{skipped}
"""


def timeline_table(judgement: Judgement) -> list[dict]:
    return [
        {
            "from (UTC)": _when(row.start),
            "canary images": row.canary_images,
            "shadow agreement": _share(row.agreement),
            "canary accuracy (estimated)": _share(row.canary_accuracy),
            "stable accuracy (estimated)": _share(row.stable_accuracy),
            "canary p99 ms": "" if row.canary_p99_ms is None else f"{row.canary_p99_ms:g}",
        }
        for row in judgement.timeline
    ]


def monitor_markdown(report: MonitorReport) -> str:
    judged = [p for p in report.periods if p.judged]
    said = [
        "input drift in the last periods" if report.drift else "",
        "estimated accuracy below its bound" if report.estimate_low else "",
    ]
    state = " and ".join(s for s in said if s) or "nothing to report"
    latest = report.latest_estimate
    if report.left_out or report.skipped:
        state += f" (in part of the evidence: {report.left_out} left out, {len(report.skipped)} files skipped)"
    return f"""# Champion {report.version}: {state}

Test accuracy {report.test_accuracy:.4f}; latest estimate {_share(latest) or "none (too few images)"}.
{len(judged)} of {len(report.periods)} periods had enough images to judge.
"""


def monitor_table(report: MonitorReport) -> list[dict]:
    return [
        {
            "from (UTC)": _when(p.start),
            "images": p.images,
            "drifted": "yes" if p.drifted else "no" if p.judged else "",
            "softmax p": "" if p.softmax_p is None else f"{p.softmax_p:.2g}",
            "class mix p": "" if p.class_mix_p is None else f"{p.class_mix_p:.2g}",
            **{f"accuracy ({name})": f"{value:.3f}" for name, value in p.estimates.items()},
            "reviewed": p.reviewed_images,
            "accuracy (reviewed)": _share(p.reviewed_accuracy),
        }
        for p in report.periods
    ]
