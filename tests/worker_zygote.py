"""Forks fresh `loom worker` processes with torch and transformers already imported (a test helper).

A worker's cold start is mostly imports (seconds on a busy 2-core machine);
the readiness test starts a worker 20 times. Each child here is a new
process running `loom worker` exactly as the command does (its engine, its
broker connection, its preload from disk); only the imports come from this
parent, which imported them once and never ran a torch op (so no thread pool
exists to be broken by fork).

Commands on stdin, one JSON object a line; answers on stdout, one a line:
  {"fork": [argv...], "cwd": DIR, "log": FILE}  ->  {"pid": PID}
  {"wait": PID}                                   ->  {"pid": PID, "code": EXIT_CODE}
"""
from __future__ import annotations

import json
import os
import sys

import torch  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

import workers.engine  # noqa: F401
import workers.main  # noqa: F401
from loom import cli


def _child(argv: list[str], cwd: str, log: str) -> None:
    os.setsid()  # its own process group, as the tests' other processes
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.chdir(cwd)
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


def main() -> None:
    for line in sys.stdin:
        command = json.loads(line)
        if "fork" in command:
            pid = os.fork()
            if pid == 0:
                _child(command["fork"], command["cwd"], command["log"])
            answer = {"pid": pid}
        else:
            _, status = os.waitpid(command["wait"], 0)
            answer = {"pid": command["wait"], "code": os.waitstatus_to_exitcode(status)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
