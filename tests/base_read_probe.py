"""Run by ``tests/convert_test.py`` as each of several processes: restores converted bases into an
FSDP mesh over every process's devices and prints, as one JSON line, the bytes this process read for
each (TensorStore's own counter of the bytes its file driver read, and the kernel's ``rchar`` of
``/proc/self/io``: every byte a read call of this process returned, cached or not), whether its
parameters equal the Hugging Face import's, bitwise, shard by shard, and what
``base_checkpoint.bytes_read_per_process`` predicts for chunks of ``--chunk_bytes``.

    python -m tests.base_read_probe HF_DIR BASE [BASE ...] --chunk_bytes=N --coordinator_address=...
"""

import json
import sys

from trainer import cli


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line.split()[1] for line in f if line.startswith("rchar:")))


def tensorstore_read() -> int:
    """Bytes TensorStore's file driver has read in this process (Orbax reads through it)."""
    import tensorstore as ts  # noqa: PLC0415
    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(v["value"] for m in metrics for v in m["values"])


def main(hf_dir: str, bases: list[str], chunk_bytes: int, coordinator: str, num_processes: int,
         process_id: int) -> None:
    cli.init_distributed("explicit", coordinator, num_processes, process_id)
    import jax  # noqa: PLC0415

    from tests import helpers  # noqa: PLC0415
    from trainer import sharding  # noqa: PLC0415
    from trainer.io import base_checkpoint  # noqa: PLC0415
    from trainer.training import modeling  # noqa: PLC0415

    def load(path):
        config = helpers.tiny_config(data=1, fsdp=jax.device_count(), tensor=1)
        config.model.hf_path, config.model.scan_layers = path, True
        spec = modeling.model_spec(helpers.resolved(config), 300, sharding.make_mesh(dict(config.mesh)))
        before = rchar(), tensorstore_read()
        params = jax.block_until_ready(spec.init_params(0))
        return spec, params, {"rchar": rchar() - before[0], "tensorstore": tensorstore_read() - before[1]}

    local = lambda tree: [[s.data for s in x.addressable_shards] for x in jax.tree.leaves(tree)]  # noqa: E731
    spec, reference, _ = load(hf_dir)
    predicted = base_checkpoint.bytes_read_per_process(spec.abstract_base(), chunk_bytes)
    out = {"process": jax.process_index(), "predicted": predicted[jax.process_index()]}
    for i, base in enumerate(bases):
        _, params, read = load(base)
        out[f"read_{i}"] = read
        out[f"equal_{i}"] = helpers.tree_equal(local(params), local(reference))
    print("PROBE " + json.dumps(out), flush=True)


if __name__ == "__main__":
    args, flags = [a for a in sys.argv[1:] if not a.startswith("--")], dict(
        a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    main(args[0], args[1:], int(flags["chunk_bytes"]), flags["coordinator_address"],
         int(flags["num_processes"]), int(flags["process_id"]))
