"""A durable run drawn (``eventwire topology --run RUN``): its event, then what it recorded in
the order it ran; the steps of one `Run.gather` side by side, fanned out from the stage
before and joined into the one after; waits in their own shape, dashed while pending.
"""

from __future__ import annotations

import json

from eventwire.runs import RunInfo, StepInfo

RUN_FORMATS: tuple[str, ...] = ("text", "mermaid", "dot")

_WORDS = {
    "step": "step",
    "effect": "effect",
    "model": "model",
    "stream": "stream",
    "wait": "wait for",
    "collect": "collect",
    "sleep": "sleep",
}


def stages(steps: list[StepInfo]) -> list[list[StepInfo]]:
    """The steps in stages: one step each, or the steps of one gather together."""
    found: list[list[StepInfo]] = []
    for step in steps:
        if step.group and found and found[-1][0].group == step.group:
            found[-1].append(step)
        else:
            found.append([step])
    return found


def _label(step: StepInfo) -> str:
    label = f"{_WORDS.get(step.kind, step.kind)} {step.name}"
    return label if step.resolved else label + " (waiting)"


def render_run(run: RunInfo, steps: list[StepInfo], format: str) -> str:
    """`run` drawn as text, Mermaid or Graphviz DOT."""
    if format == "mermaid":
        return _mermaid(run, stages(steps))
    if format == "dot":
        return _dot(run, stages(steps))
    return _text(run, stages(steps))


def _text(run: RunInfo, staged: list[list[StepInfo]]) -> str:
    lines = [f"run {run.id}  ({run.state}, {run.tries} tries)", "  event"]
    for stage in staged:
        if len(stage) == 1:
            lines.append(f"  └─ {_label(stage[0])}")
        else:
            lines.append("  ├─ gather (concurrently):")
            lines.extend(f"  │    • {_label(step)}" for step in stage)
    if run.state == "waiting":
        lines.append("  … parked on " + ", ".join(run.waiting))
    return "\n".join(lines) + "\n"


def _mermaid_shape(step: StepInfo, node: str) -> str:
    text = json.dumps(_label(step))
    if step.kind in ("wait", "collect", "sleep"):
        return f"{node}{{{{{text}}}}}"
    if step.kind == "effect":
        return f"{node}[[{text}]]"
    return f"{node}[{text}]"


def _mermaid(run: RunInfo, staged: list[list[StepInfo]]) -> str:
    lines = ["flowchart TD", f"  event([{json.dumps('event ' + run.event_id)}])"]
    previous = ["event"]
    pending = []
    for number, stage in enumerate(staged):
        nodes = [f"s{number}_{index}" for index in range(len(stage))]
        for node, step in zip(nodes, stage, strict=True):
            lines.append("  " + _mermaid_shape(step, node))
            if not step.resolved:
                pending.append(node)
        lines.extend(f"  {before} --> {after}" for before in previous for after in nodes)
        previous = nodes
    if pending:
        lines.append("  classDef pending stroke-dasharray: 5 5")
        lines.append(f"  class {','.join(pending)} pending")
    return "\n".join(lines) + "\n"


def _dot(run: RunInfo, staged: list[list[StepInfo]]) -> str:
    lines = [
        "digraph run {",
        "  rankdir=TB;",
        f"  event [shape=oval, label={json.dumps('event ' + run.event_id)}];",
    ]
    previous = ["event"]
    for number, stage in enumerate(staged):
        nodes = [f"s{number}_{index}" for index in range(len(stage))]
        for node, step in zip(nodes, stage, strict=True):
            shape = {"wait": "hexagon", "collect": "hexagon", "sleep": "hexagon"}.get(
                step.kind, "box"
            )
            style = ', style="dashed"' if not step.resolved else ""
            if step.kind == "effect":
                style += ", peripheries=2"
            lines.append(f"  {node} [shape={shape}{style}, label={json.dumps(_label(step))}];")
        lines.extend(f"  {before} -> {after};" for before in previous for after in nodes)
        previous = nodes
    lines.append("}")
    return "\n".join(lines) + "\n"
