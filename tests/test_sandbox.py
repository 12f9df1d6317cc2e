"""The `python` tool against hostile code: each attempt is stopped or refused, reported to the model as a
tool error, and the trainer's process goes on unaffected."""

import os
import socket
import threading

import pytest

from twofold.envs import sandbox
from twofold.envs.sandbox import python


@pytest.fixture(autouse=True)
def quick_limits(monkeypatch):
    monkeypatch.setattr(sandbox, "TIMEOUT_S", 2.0)
    monkeypatch.setattr(sandbox, "CPU_SECONDS", 1)


def test_ordinary_code_prints_and_keeps_its_files_in_its_directory():
    assert python("print(sum(range(10)))") == "45"
    assert python("open('notes.txt', 'w').write('ok'); print(open('notes.txt').read())") == "ok"
    assert (
        python("import os; print(sorted(os.listdir('.')))") == "['.output', 'main.py']"
    )  # a fresh directory of its own


def test_an_error_is_the_model_s_traceback():
    out = python("x = 1 / 0")
    assert out.startswith("error: exit status 1") and "ZeroDivisionError" in out and "guard" not in out


def test_an_infinite_loop_is_stopped():
    out = python("while True: pass")
    assert out.startswith("error: stopped after")  # CPU time (SIGXCPU) or wall clock, whichever first


def test_a_sleeping_program_is_stopped_by_the_wall_clock():
    assert python("import time; time.sleep(60)") == "error: stopped after 2 s of wall-clock time"


def test_a_fork_bomb_is_refused():
    out = python("import os\nwhile True:\n    os.fork()")
    assert out.startswith("error:") and "os.fork is not allowed" in out
    out = python("import subprocess; subprocess.run(['sh', '-c', ':(){ :|:& };:'])")
    assert out.startswith("error:") and "not allowed" in out


def test_a_memory_bomb_is_stopped():
    out = python("x = bytearray(8 * 1024**3)")
    assert out.startswith("error:") and "MemoryError" in out


def test_huge_output_is_cut():
    out = python("while True: print('x' * 1000)")
    assert out.startswith(f"error: stopped after {sandbox.MAX_OUTPUT_FILE} bytes of output")
    assert out.endswith("... (output cut)") and len(out) < sandbox.MAX_OUTPUT + 200


def test_the_trainer_s_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("TWOFOLD_SECRET_TOKEN", "hunter2")
    assert "hunter2" not in python("import os; print(os.environ)")
    out = python(f"print(open('/proc/{os.getpid()}/environ').read())")  # the parent's, through /proc
    assert out.startswith("error:") and "hunter2" not in out


def test_writing_outside_its_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    out = python(f"open({str(target)!r}, 'w').write('x')")
    assert out.startswith("error:") and "outside the working directory" in out and not target.exists()


def test_opening_a_socket_is_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    port = server.getsockname()[1]
    out = python(f"import socket; s = socket.socket(); s.connect(('127.0.0.1', {port})); print('connected')")
    server.close()
    assert out.startswith("error:") and "connected" not in out.splitlines()[-1] and not accepted


def test_native_code_is_refused():
    out = python("import ctypes; ctypes.CDLL(None).system(b'true')")
    assert out.startswith("error:") and "not allowed" in out


def test_as_a_tool_of_an_env_a_failure_is_an_observation(tmp_path):
    import json

    from twofold.envs import make_env
    from twofold.envs.tools import format_call

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2**10?", "answer": "1024"}) + "\n")
    env = make_env(
        "dataset",
        max_turns=3,
        options={"path": str(path), "tools": ["twofold.envs.sandbox:python"], "eval_fraction": 0.0},
    )
    env.reset(0)
    assert [s["function"]["name"] for s in env.tool_schemas] == ["python"]
    _, _, done, info = env.step(format_call("python", {"code": "while True: pass"}))
    assert info["messages"][0]["content"].startswith("error: stopped") and not done and info["format_ok"]
    _, _, _, info = env.step(format_call("python", {"code": "print(2**10)"}))
    assert info["messages"] == [{"role": "tool", "content": "1024"}]
