"""Device mesh and the ONE logical-axis rules table.

Every param carries its logical axes (`embed`, `mlp`, `heads`, ...) in NNX's standard sharding
metadata, `out_sharding` (see `llava_jax.models.layers.make_param`); activations/batches use
`batch` and `length`. `LOGICAL_RULES` maps each logical axis to mesh axes (`data`, `fsdp`,
`tensor`); params get their specs from `nnx.get_partition_spec` under these rules
(`flax_rules`). On top of NNX's renaming, a dimension that a mesh axis does not divide is
replicated instead (so tiny test models run on any mesh), and a mesh axis is used at most once
per array (`fit_spec`).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (tuple = sharded over their product), in priority order.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "layers": (),
    "embed": ("fsdp",),
    "vision_embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "vocab": ("tensor",),
    # LoRA adapters' rank axis. Half of the factors (B of q/k/v/gate/up, A of o/down) have no
    # `embed` axis, so without this they sit whole on every chip of an FSDP-only mesh (and so do
    # their Adam moments). Over `fsdp` they shard like the kernels do; an A or B that already has
    # `embed` keeps one fsdp-sharded axis (a mesh axis is used once per array), and a rank that
    # fsdp does not divide is replicated (`fit_spec`). Their all-gather in the step is the
    # FSDP weight gather the kernels already do (r x out per layer, far smaller).
    "lora_rank": ("fsdp",),
}


def resolve_mesh_shape(shape: dict[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Sizes for (data, fsdp, tensor); one entry may be -1 = the remaining devices."""
    sizes = [int(shape[a]) for a in MESH_AXES] if isinstance(shape, dict) else [int(s) for s in shape]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(shape: dict[str, int] | Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh laid out along the physical topology (TPU ICI) where JAX
    knows how; `devices` may be a subset, or a TPU topology's devices for AOT compiles."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    # Auto axes: GSPMD propagates shardings from params and batches (no sharding-in-types).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(sizes, MESH_AXES, devices=devices, axis_types=auto)
    except (ValueError, NotImplementedError, AssertionError):
        from jax.experimental import mesh_utils

        try:  # shapes that cut a physical axis (e.g. 2 x 16 on a 4x4x2 slice)
            grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(sizes)
        return Mesh(grid, MESH_AXES, axis_types=auto)


def flax_rules(rules: dict[str, tuple[str, ...]] = LOGICAL_RULES) -> tuple:
    """The table in Flax's `LogicalRules` form, ((logical, mesh axes or None), ...), for
    `nnx.logical_axis_rules`: inside it `nnx.get_partition_spec(state)` maps the params' logical
    names to these mesh axes (names only; `fit_spec` then makes the spec fit the array)."""
    return tuple((name, (axes[0] if len(axes) == 1 else tuple(axes)) if axes else None)
                 for name, axes in rules.items())


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """`spec` made valid for an array of `shape` on `mesh`. NNX's logical->mesh mapping renames
    axes only, so its specs can name a mesh axis twice in one array (the projector kernel is
    (vision_embed, embed), both `fsdp`) or split a dimension the mesh axis does not divide (tiny
    test models on 8 devices); both fail at placement. Per dimension, in order: drop mesh axes
    already used by an earlier one, of size 1, or not in `mesh`; keep the longest prefix of the
    rest whose product divides the dimension (none = replicated)."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    used: set[str] = set()
    out = []
    for entry, dim in zip(entries, shape):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        mesh_axes = [a for a in names if a in mesh.shape and a not in used and mesh.shape[a] > 1]
        while mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes):
            mesh_axes.pop()
        used.update(mesh_axes)
        out.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return P(*out)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, tuple[str, ...]] = LOGICAL_RULES) -> P:
    """PartitionSpec of a plain array (not a param; e.g. the KV cache) with these logical axes:
    the renaming NNX applies to params' `out_sharding` (`from_sharding_rules`), then `fit_spec`."""
    from flax.core.spmd import from_sharding_rules

    return fit_spec(P(*from_sharding_rules(tuple(axes), flax_rules(rules))), shape, mesh)


def named_sharding(axes, shape, mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def _is_variable(x) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def state_specs(state, mesh: Mesh, rules=LOGICAL_RULES):
    """PartitionSpec for every Variable of an nnx.State (same tree, the spec in each Variable's
    place): `nnx.get_partition_spec` under `nnx.logical_axis_rules(flax_rules(rules))` (Variables
    without `out_sharding` get P()), then `fit_spec` for each value's shape."""
    from flax import nnx

    with nnx.logical_axis_rules(flax_rules(rules)):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda v, s: fit_spec(s.get_value(), v.get_value().shape, mesh), state, specs,
                        is_leaf=_is_variable)


def state_shardings(state, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedSharding for every Variable of an nnx.State (same tree, the sharding in each
    Variable's place: a valid `out_shardings` / `device_put` target for the state)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, mesh, rules))


def abstract_model(init_fn, mesh: Mesh | None = None, rules=LOGICAL_RULES):
    """(graphdef, state) of the model `init_fn` builds, nothing allocated: each Variable holds a
    ShapeDtypeStruct carrying its sharding on `mesh` (no sharding without a mesh). The one place
    that builds an abstract model for its shardings (the trainer's init, HF loading, the AOT
    compile). `nnx.get_abstract_model` has this contract but places NNX's unfitted specs, which
    fail on our models (see `fit_spec`)."""
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(init_fn))
    if mesh is None:
        return graphdef, state

    def place(v, sharding):
        x = v.get_value()
        return v.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding))

    return graphdef, jax.tree.map(place, state, state_shardings(state, mesh, rules), is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int, rules=LOGICAL_RULES) -> NamedSharding:
    """Leading dim over the batch axes, the rest replicated."""
    batch_axes = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
    lead = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, rules=LOGICAL_RULES) -> int:
    return math.prod(mesh.shape[a] for a in rules["batch"])


def process_data_shard(mesh: Mesh, rules=LOGICAL_RULES) -> tuple[int, int]:
    """(shard index, shard count) of the input data this process must read.

    A process feeds the batch rows that its devices hold. Processes whose devices hold the
    same rows (the batch is replicated over a mesh axis that spans hosts, e.g. `tensor`) must
    read the same data; processes with different rows read disjoint shards. On the usual
    layouts (batch over `data`/`fsdp` spanning hosts) this is (process_index, process_count).
    """
    n = data_parallel_size(mesh, rules)
    index_map = batch_sharding(mesh, 1, rules).devices_indices_map((n,))
    rows: dict[int, set[int]] = {}
    for d, idx in index_map.items():
        rows.setdefault(d.process_index, set()).update(range(*idx[0].indices(n)))
    return shard_of(rows, jax.process_index(), n, dict(mesh.shape))


def shard_of(rows_by_process: dict[int, set[int]], process: int, n: int, mesh_shape=None) -> tuple[int, int]:
    """Group processes by the batch rows they hold: (index of `process`'s group, group count)."""
    groups = sorted({frozenset(r) for r in rows_by_process.values()}, key=min)
    if len({len(g) for g in groups}) != 1 or sum(map(len, groups)) != n:
        raise ValueError(f"the mesh {mesh_shape} gives processes overlapping or uneven batch rows "
                         f"({[sorted(g) for g in groups]}); order the mesh so that each host holds whole "
                         "data-parallel groups (batch axes outermost)")
    return groups.index(frozenset(rows_by_process[process])), len(groups)

