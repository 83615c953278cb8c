"""What trains when (``control_training_schedule``): every optimizer group carries a ``role`` (the
modes' ``param_groups``: ``controlnet``, ``adapter``); a schedule says, per optimizer step, which roles
are active. ``standard``: all, every step. ``ping_pong``: ``schedule.phases`` in order, ``schedule.period``
optimizer steps each, cycling. ``alternate``: the phase switches every optimizer step (``period`` 1).

The step is Lightning's ``global_step`` (optimizer steps, not batches: with gradient accumulation a
phase spans ``period`` whole accumulated steps), so a resumed run continues in the phase it left."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("standard", "ping_pong", "alternate")
BOTH = "both"  # a phase in which every role trains


@dataclass(frozen=True)
class Schedule:
    kind: str = "standard"
    period: int | None = None  # optimizer steps per phase; None: standard (one phase, always)
    phases: tuple[str, ...] | None = None

    @property
    def standard(self) -> bool:
        return self.kind == "standard"

    def phase_index(self, step: int) -> int:
        """The phase of optimizer step ``step`` (0-based: the ``global_step`` before it runs)."""
        if self.standard:
            return 0
        return (int(step) // self.period) % len(self.phases)

    def phase(self, step: int) -> str:
        return BOTH if self.standard else self.phases[self.phase_index(step)]

    def active(self, role: str | None, step: int) -> bool:
        """Whether a group of ``role`` trains at optimizer step ``step``."""
        phase = self.phase(step)
        return phase == BOTH or role == phase

    def record(self) -> dict:
        """What a checkpoint records (and a resume compares): the schedule as it acts."""
        return {"kind": self.kind, "period": self.period, "phases": list(self.phases) if self.phases else None}


def parse_schedule(research) -> Schedule:
    """The run's schedule from its research options (``control_training_schedule``, ``schedule``);
    a bad value fails naming its key. Roles are checked against the run's groups by ``check_roles``."""
    research = research or {}
    kind = str(research.get("control_training_schedule") or "standard")
    if kind not in KINDS:
        raise ValueError(f"control_training_schedule={kind!r}: use one of {KINDS}")
    if kind == "standard":
        return Schedule()
    options = research.get("schedule") or {}
    phases = options.get("phases")
    if phases is None or isinstance(phases, str) or not len(phases):
        raise ValueError(f"schedule.phases={phases!r}: a list of phases, e.g. [controlnet, adapter] "
                         f"(control_training_schedule={kind})")  # fmt: skip
    phases = tuple(str(p) for p in phases)
    if kind == "alternate":
        return Schedule(kind, 1, phases)  # every step switches: schedule.period does not apply
    period = options.get("period")
    try:
        period = int(period)
    except (TypeError, ValueError):
        raise ValueError(f"schedule.period={period!r}: a whole number of optimizer steps >= 1") from None
    if period < 1:
        raise ValueError(f"schedule.period={period}: a whole number of optimizer steps >= 1 (ping_pong)")
    return Schedule(kind, period, phases)


def check_roles(schedule: Schedule, groups: list[dict], mode: str) -> None:
    """Every phase names ``both`` or a role this run trains; every group has a role a phase can name."""
    if schedule.standard:
        return
    roles = [g.get("role") for g in groups]
    for group, role in zip(groups, roles, strict=True):
        if role is None:
            raise ValueError(f"control_training_schedule={schedule.kind}: training_mode {mode}'s parameter group "
                             f"{group.get('name')!r} has no role, so no phase can schedule it")  # fmt: skip
    trained = sorted(set(roles))
    for i, phase in enumerate(schedule.phases):
        if phase != BOTH and phase not in trained:
            raise ValueError(f"schedule.phases[{i}]={phase!r}: this run (training_mode {mode}) trains no {phase}; "
                             f"its roles are {trained}, or {BOTH!r}")  # fmt: skip
    named = set(schedule.phases)
    idle = [r for r in trained if BOTH not in named and r not in named]
    if idle:
        raise ValueError(f"schedule.phases={list(schedule.phases)}: no phase trains {idle} (training_mode {mode}); "
                         "name it in a phase, or freeze it in the mode's config")  # fmt: skip
