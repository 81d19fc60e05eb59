"""What an index snapshot remembers of the model switch, so a restart can resume it.

The decision log (``model-updates``) normally tells a restarted worker which model to serve. A
broker that lost its logs (the embedded one keeps them in memory only) tells it nothing, and a
snapshot taken mid-switch holds an index the restarted worker would otherwise never finish: it
would serve the configured model again. :class:`SwitchRecord` is written in ``MODELS.json`` with
the indexes it describes (:meth:`~samestyle.streams.switch.indexes.ModelIndexes.snapshot`): the
target version the worker followed, the switch's state then, and the promoted models (version and
directory) of the served and the target version. At start-up the registry puts those promotions
in front of whatever the log holds (:meth:`~samestyle.streams.switch.registry.ModelRegistry.restore`),
so one state machine resumes the switch, and any promotion on the log supersedes them.

The re-embedding's progress is not recorded: a resumed switch re-embeds its partitions from
offset 0 (idempotent; the log it read may be another one by then, as after a lost broker).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecordedModel:
    """A promoted model as the snapshot remembers it."""

    version: str
    model_dir: str


@dataclass(frozen=True)
class SwitchRecord:
    """The model a worker followed when its snapshot was written (``target``), the switch's state
    then (``state``: a ``SwitchState`` value, for the log), and ``models``: the promoted models
    among the served and the target version, in decision-log order (the target last when promoted)."""

    target: str
    state: str
    models: tuple[RecordedModel, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "state": self.state,
                "models": [{"version": m.version, "model_dir": m.model_dir} for m in self.models]}

    @classmethod
    def from_json(cls, data: Any) -> SwitchRecord:
        """Parse :meth:`to_json`'s form; TypeError or ValueError when it is not one."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a switch record is an object, not {type(data).__name__}")
        target, state, models = data.get("target"), data.get("state"), data.get("models", [])
        if not isinstance(target, str) or not target or not isinstance(state, str) or not isinstance(models, list):
            raise ValueError(f"malformed switch record {dict(data)!r}")
        recorded = []
        for model in models:
            if not (isinstance(model, Mapping) and isinstance(model.get("version"), str)
                    and isinstance(model.get("model_dir"), str)):
                raise TypeError(f"malformed model {model!r} in switch record")
            recorded.append(RecordedModel(model["version"], model["model_dir"]))
        return cls(target, state, tuple(recorded))


__all__ = ["RecordedModel", "SwitchRecord"]
