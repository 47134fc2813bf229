"""Reuse a snapshot for a model with another head: keep what fits, re-initialise the rest, say which.

The popular fix drops every key containing ``head`` and loads with ``strict=False``,
which also hides real errors. Here the target model is built from its
``pytorch_config.yaml``; every key of the source whose name and shape fit is kept;
the others are dropped and listed, and the target's own freshly initialised tensors take
their place, so the result loads strictly (as ``snapshot_path``) or backbone-first (as
``train_settings.weight_init``). Anything outside the heads that does not fit is refused
unless explicitly allowed, and the refusal says which case it is: other names (another
net_type), or the same names with other shapes (parts sized by the bodyparts: AnimalTokenPose's
keypoint tokens, CTD's conditioning layers). The source file is never written.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlc_snapshot_fix import keys, store, transforms
from dlc_snapshot_fix.diagnose import heatmap_count
from dlc_snapshot_fix.reading import load_snapshot
from dlc_snapshot_fix.verify import build_pose_model, model_config_from

HEAD = "heads."


class AdaptRefusedError(ValueError):
    """Adapting would drop more than the heads; nothing was written."""


@dataclass(frozen=True)
class AdaptPlan:
    """Which target keys come from the source, which are re-initialised, which source keys are dropped."""

    kept: list[str]
    reinitialised: list[str]
    dropped: list[str]

    @property
    def outside_heads(self) -> list[str]:
        return sorted({k for k in (*self.reinitialised, *self.dropped) if not k.startswith(HEAD)})

    @property
    def resized_outside_heads(self) -> list[str]:
        """Keys outside the heads both sides have, with other shapes: the same network, parts sized by bodyparts."""
        return sorted(k for k in set(self.reinitialised) & set(self.dropped) if not k.startswith(HEAD))


def plan_adaptation(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> AdaptPlan:
    """Pure: match keys by name and shape."""
    fits = [k for k, t in target.items() if k in source and tuple(source[k].shape) == tuple(t.shape)]
    fitting = set(fits)
    return AdaptPlan(
        kept=fits,
        reinitialised=[k for k in target if k not in fitting],
        dropped=[k for k in source if k not in fitting],
    )


def adapted_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], plan: AdaptPlan
) -> OrderedDict[str, torch.Tensor]:
    """The target's key order and ``_metadata``, the source's tensors where they fit."""
    kept = set(plan.kept)
    result: OrderedDict[str, torch.Tensor] = OrderedDict((k, source[k] if k in kept else t) for k, t in target.items())
    metadata = getattr(target, "_metadata", None)
    if metadata is not None:
        result._metadata = metadata  # type: ignore[attr-defined]
    return result


def adapt_snapshot(
    source: Path, target_config: Path, output: Path, *, allow_non_head: bool = False, overwrite: bool = False
) -> AdaptPlan:
    """Write to ``output`` the snapshot ``source`` adapted to the model ``target_config`` describes."""
    source, output = Path(source), Path(output)
    if output.exists() and (output.resolve() == source.resolve() or not overwrite):
        raise FileExistsError(f"{output} exists; choose another --output (the source is never overwritten)")
    model_config, reason = model_config_from(Path(target_config))
    if model_config is None:
        raise ValueError(reason)
    snapshot = load_snapshot(source)
    transforms.check_nesting(snapshot)
    stripped, _ = transforms.strip_wrapper_prefixes(snapshot, ("model",))
    target = build_pose_model(model_config).state_dict()
    plan = plan_adaptation(stripped["model"], target)
    changes = [(k, tuple(stripped["model"][k].shape), tuple(target[k].shape)) for k in plan.resized_outside_heads]
    by_bodyparts = plan.outside_heads == plan.resized_outside_heads and keys.resized_by_a_count(
        changes, heatmap_count(model_config)
    )
    if plan.outside_heads and not allow_non_head and by_bodyparts:
        raise AdaptRefusedError(
            f"{source} is the network {target_config} describes, but {len(changes)} tensor(s) outside the heads "
            f"have other shapes ({keys.shape_changes(changes)}): parts sized by the bodyparts (AnimalTokenPose's "
            "keypoint tokens, CTD's conditioning layers). Nothing was written. --allow-non-head re-initialises "
            f"them too; the {len(plan.kept)} tensors that fit are kept"
        )
    if plan.outside_heads and not allow_non_head:
        shown = ", ".join(f"{m}: {n}" for m, n in keys.group_by_module(plan.outside_heads).items())
        raise AdaptRefusedError(
            f"{source} does not fit {target_config} outside the heads ({shown}): it was trained with another "
            "network (net_type). Nothing was written. --allow-non-head re-initialises those parts too "
            "(then it is hardly a pretrained model any more)"
        )
    metadata: dict[str, Any] = {
        "epoch": 0,
        "metrics": {},
        "losses": {},
        "adapted_from": str(source),
        "adapted_from_sha256": store.sha256_of(source),
        "reinitialised": plan.reinitialised,
        "dropped": plan.dropped,
    }
    result = {"metadata": metadata, "model": adapted_state_dict(stripped["model"], target, plan)}
    output.parent.mkdir(parents=True, exist_ok=True)
    temp, _ = store.write_temp(output, result, expected_size=source.stat().st_size)
    store.commit_temp(temp, output)
    return plan
