"""``autopar run``'s two wrappers around torch.distributed.run (launch.run_script).

``python -m autopar._rankrun agent TORCHRUN_ARGS...`` runs torchrun's agent, which stops every rank
when one fails; it then prints the first failing rank's traceback and a line naming it
(launch.explain_failures), instead of torchrun's summary. ``python -m autopar._rankrun rank SCRIPT
ARGS...`` is what each rank runs: SCRIPT as ``python SCRIPT ARGS`` would, an exception escaping it
recorded in ``$AUTOPAR_FAILURE_DIR`` for the agent.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys

from .launch import FAILURE_DIR_ENV, Failure, explain_failures


def rank(script: str, *args: str) -> None:
    sys.argv, sys.path[0] = [script, *args], os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
        return
    except SystemExit as e:
        if e.code in (None, 0):
            return
        code, failure = e.code if isinstance(e.code, int) else 1, Failure.of(int(os.environ["RANK"]), e, False)
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt too: the agent reports it
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:  # from the script's frame on
            tb = tb.tb_next
        code, failure = 1, Failure.of(int(os.environ["RANK"]), e.with_traceback(tb or e.__traceback__))
    path = os.path.join(os.environ[FAILURE_DIR_ENV], f"rank{failure.rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(failure.__dict__, f)
    os.replace(path + ".tmp", path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # now: the peers' collectives fail when this rank's sockets close


def agent(*torchrun_args: str) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(torchrun_args))
    try:
        run(args)
        return 0
    except ChildFailedError as e:
        faildir = os.environ[FAILURE_DIR_ENV]
        failures = {}
        for name in os.listdir(faildir):
            if name.endswith(".json"):
                with open(os.path.join(faildir, name)) as f:
                    failure = Failure(**json.load(f))
                failures[failure.rank] = failure
        # the agent stops the ranks still running with SIGTERM: those did not fail, they were stopped
        codes = {r: None if f.exitcode == -signal.SIGTERM else f.exitcode for r, f in e.failures.items()}
        root, head, tb, after = explain_failures(int(args.nproc_per_node), failures, codes)
        print("\n".join([*([f"rank {root}: {tb}"] if tb else []), *(f"autopar: {line}" for line in [*after, head])]),
              file=sys.stderr, flush=True)
        code = codes.get(root)
        return code if isinstance(code, int) and code > 0 else 1


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    if role == "rank":
        rank(*rest)
    else:
        sys.exit(agent(*rest))
