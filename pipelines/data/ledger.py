"""A cluster-wide ledger of unusable objects: one small Ray actor that every decode task reports to, so the stage
can print one summary (by key and reason) at its end and stop when too large a fraction is bad."""

from __future__ import annotations

from typing import Any

import ray

from pipelines.data.transforms import check_fraction, summarise


@ray.remote(num_cpus=0)
class _LedgerActor:
    def __init__(self, max_fraction: float, min_seen: int):
        self.max_fraction, self.min_seen = max_fraction, min_seen
        self.seen, self.skipped = 0, []

    def record(self, seen: int, skipped: list[tuple[str, str]]) -> str | None:
        self.seen += seen
        self.skipped.extend(skipped)
        try:
            check_fraction(self.seen, len(self.skipped), self.max_fraction, self.min_seen, self.skipped)
        except RuntimeError as err:
            return str(err)
        return None

    def summary(self) -> dict[str, Any]:
        return summarise(self.seen, self.skipped)


class RayLedger:
    """Serializable handle to the ledger actor; ``record`` raises ``TooManyBadImages`` in the reporting task."""

    def __init__(self, max_fraction: float, min_seen: int):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: an actor that Ray placed on a worker node would take every decode task down with
        # that node (a lost node must cost only its own workers; the driver's node going away ends the stage anyway).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._actor = _LedgerActor.options(scheduling_strategy=here).remote(max_fraction, min_seen)

    def record(self, seen: int, skipped: list[tuple[str, str]]) -> None:
        from pipelines.data.transforms import TooManyBadImages

        if not skipped and seen == 0:
            return
        error = ray.get(self._actor.record.remote(seen, skipped))
        if error:
            raise TooManyBadImages(error)

    def summary(self) -> dict[str, Any]:
        return ray.get(self._actor.summary.remote())
