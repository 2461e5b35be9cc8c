"""Run real ``jsctl`` sessions from tests.

Each JacSession is a directory with its own ``js.session`` file (jsctl without -m
keeps its state there) and its own LLM_MODULE_HOME, so tests never share state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "jac_examples"
JSCTL = str(Path(sys.executable).with_name("jsctl"))


class JacSession:
    def __init__(self, workdir: Path, env: dict | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}

    def run(self, *args: str, timeout: float = 600) -> tuple[dict | list | None, str]:
        """Run ``jsctl ARGS``; return (the JSON it printed last, the whole output)."""
        proc = subprocess.run(
            [JSCTL, *args], cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        out = proc.stdout + proc.stderr
        return last_json(proc.stdout), out

    def load_module(self, ctx: dict | None = None) -> dict:
        args = ["actions", "load", "module", "llm_module.llm"]
        if ctx is not None:
            args += ["-ctx", json.dumps(ctx)]
        result, out = self.run(*args)
        assert result and result.get("success"), out[-3000:]
        return result

    def load_local(self, ctx: dict | None = None) -> dict:
        args = ["actions", "load", "local", str(REPO / "llm_module" / "llm.py")]
        if ctx is not None:
            args += ["-ctx", json.dumps(ctx)]
        result, out = self.run(*args)
        assert result and result.get("success"), out[-3000:]
        return result

    def load_remote(self, url: str, ctx: dict | None = None) -> dict:
        args = ["actions", "load", "remote", url]
        if ctx is not None:
            args += ["-ctx", json.dumps(ctx)]
        result, out = self.run(*args)
        assert result and result.get("success"), out[-3000:]
        return result

    def call(self, action: str, ctx: dict | None = None) -> tuple[dict, str]:
        """``jsctl actions call llm.X -ctx {...}``: ({'success':..., 'result':...}, output)."""
        return self.run("actions", "call", action, "-ctx", json.dumps(ctx or {}))

    def script(self, *commands: str, timeout: float = 600) -> tuple[list, str]:
        """Run several jsctl commands in ONE process (``jsctl -m script``); return every JSON value printed."""
        script = self.workdir / "commands.jsctl"
        script.write_text("\n".join(commands) + "\n", encoding="utf-8")
        proc = subprocess.run(
            [JSCTL, "-m", "script", str(script)], cwd=self.workdir, env=self.env,
            capture_output=True, text=True, timeout=timeout,
        )
        return all_json(proc.stdout), proc.stdout + proc.stderr

    def jac_run(self, jac_file: str | Path, ctx: dict | None = None, walker: str = "init",
                timeout: float = 900) -> tuple[dict, str]:
        """``jsctl jac run FILE [-walk W] [-ctx {...}]``: (its JSON result, output)."""
        path = Path(jac_file)
        if not path.is_absolute():
            path = EXAMPLES / path
        args = ["jac", "run", str(path), "-walk", walker]
        if ctx is not None:
            args += ["-ctx", json.dumps(ctx)]
        result, out = self.run(*args, timeout=timeout)
        assert isinstance(result, dict), out[-3000:]
        return result, out


def all_json(text: str) -> list:
    """Every top-level JSON value in jsctl's output, in order."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    text = "\n" + text
    while True:
        starts = [i for i in (text.find("\n{", pos), text.find("\n[", pos)) if i != -1]
        if not starts:
            return values
        try:
            value, end = decoder.raw_decode(text, min(starts) + 1)
            values.append(value)
            pos = end
        except ValueError:
            pos = min(starts) + 1


def last_json(text: str):
    """The last top-level JSON value jsctl printed (it prints logs before it)."""
    lines = text.splitlines()
    for start in range(len(lines) - 1, -1, -1):
        if lines[start].startswith(("{", "[")):
            try:
                return json.loads("\n".join(lines[start:]))
            except ValueError:
                continue
    return None
