"""Cluster flags and the start-up handshake of apps that run as many processes (BUILD.md).

Only apps that split their work over processes import this module, so only they accept
``--coordinator_address / --num_processes / --process_id / --distributed_auto``; every other
app refuses those flags as unknown before any compute (absl), instead of accepting and
ignoring them.

The handshake (:func:`agree_on_out_dir`): process 0 checks the results directory (lock,
fingerprint, versions, ``--overwrite``), writes config.json and publishes its verdict through
JAX's coordinator (the key-value store of ``jax.distributed``). Every other process waits for
that verdict, refuses exactly as process 0 did, and otherwise checks config.json against its own
configuration before it reads or writes anything; process 0 waits for every process's answer
before any compute. So no process computes into a directory whose configuration it has not
verified, and processes started with different flags all stop with one message.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from crit import store

FLAGS = flags.FLAGS

flags.DEFINE_string("coordinator_address", None, "host:port of process 0 to start JAX's "
                    "multi-controller runtime by hand (with --num_processes, --process_id).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_bool("distributed_auto", False, "Call jax.distributed.initialize() with the "
                  "cluster's environment (TPU pods, SLURM).")
flags.DEFINE_float("assemble_timeout", 3600.0, "Seconds process 0 waits for the other "
                   "processes' chunks before assembling (a rerun assembles what is there).")
flags.DEFINE_float("startup_timeout", 600.0, "Seconds a process waits for the others to agree "
                   "on the results directory at start-up.")

VERDICT_KEY = "crit/out_dir/verdict"
ANSWER_KEY = "crit/out_dir/answer/{}"
OK = "ok"


def cluster_errors() -> list[str]:
    e: list[str] = []
    if FLAGS.coordinator_address:
        if FLAGS.distributed_auto:
            e.append("--coordinator_address and --distributed_auto exclude each other")
        if FLAGS.num_processes is None or FLAGS.num_processes < 1:
            e.append(f"--num_processes={FLAGS.num_processes}: must be >= 1 with "
                     "--coordinator_address")
        elif FLAGS.process_id is None or not 0 <= FLAGS.process_id < FLAGS.num_processes:
            e.append(f"--process_id={FLAGS.process_id}: must be in [0, --num_processes)")
        if ":" not in FLAGS.coordinator_address:
            e.append(f"--coordinator_address={FLAGS.coordinator_address}: expected host:port")
    elif FLAGS.num_processes is not None or FLAGS.process_id is not None:
        e.append("--num_processes/--process_id need --coordinator_address")
    for name in ("assemble_timeout", "startup_timeout"):
        if getattr(FLAGS, name) < 0:
            e.append(f"--{name}={getattr(FLAGS, name)}: must be >= 0")
    return e


def start_cluster() -> None:
    from crit.parallel import maybe_initialize_distributed

    maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                 FLAGS.process_id, FLAGS.distributed_auto)


def agree_on_out_dir(out_dir: Path, config: dict, outputs=(), chunked: bool = True) -> bool:
    """Every process agrees to use ``out_dir`` for ``config``, or all stop; True if resuming.

    Single process: ``store.prepare_out_dir``. Many: the handshake of the module docstring.
    Raises ``app.UsageError`` with the same message on every process that refuses.
    """
    import jax

    from crit.parallel import publish, receive

    count, me = jax.process_count(), jax.process_index()
    timeout = FLAGS.startup_timeout
    if me == 0:
        try:
            resuming = store.prepare_out_dir(out_dir, config, FLAGS.overwrite, outputs=outputs,
                                             chunked=chunked)
        except store.ResultsDirError as exc:
            if count > 1:
                publish(VERDICT_KEY, f"process 0 refused: {exc}")
            raise app.UsageError(str(exc)) from None
        if count == 1:
            return resuming
        publish(VERDICT_KEY, OK)
        refusals = []
        for p in range(1, count):
            answer = receive(ANSWER_KEY.format(p), timeout)
            if answer != OK:
                refusals.append(f"process {p}: {answer or f'no answer in {timeout:g} s'}")
        if refusals:
            raise app.UsageError("other processes refused --out_dir:\n" + "\n".join(refusals))
        return resuming
    verdict = receive(VERDICT_KEY, timeout)
    if verdict != OK:
        message = verdict or (f"process 0 gave no verdict on --out_dir={out_dir} within "
                              f"--startup_timeout={timeout:g} s")
        raise app.UsageError(message)
    try:
        store.check_config(out_dir, config)
    except store.ResultsDirError as exc:
        publish(ANSWER_KEY.format(me), str(exc))
        raise app.UsageError(f"process {me}: {exc}") from None
    publish(ANSWER_KEY.format(me), OK)
    return (out_dir / store.CHUNK_DIR).is_dir() and any((out_dir / store.CHUNK_DIR).iterdir())
