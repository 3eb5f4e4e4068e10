"""Run every case of the bad-input catalogue (``bad_inputs.CASES``) through ``distillery.cli.main``.

Each must exit with its status (2 for a user error) after printing exactly one message line (no
traceback), matching the case's pattern, and must leave nothing new in its output folder but
complete bookkeeping files. The last test renders the table to ``docs/errors.md`` and checks the
file is current (``scripts/gen_errors_doc.py`` rewrites it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from bad_inputs import CASES, HELD, Ctx
from distillery.cli import main
from helpers_run import make_corpus, make_teacher
from openai_stub import StubServer

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "errors.md"
SEEN: dict[str, str] = {}
NOISE = re.compile(r"(it/s\]|s/it\]|^Loading weights|^Writing model shards|^\s*$)")
BOOKKEEPING = (".summary.json", ".failures", ".lock", "config.yaml")  # complete files a stopped run may leave


class _BadServer:
    """Answers ``/401/...`` and ``/404/...`` with those statuses, ``/garbage/...`` with 200 and a non-completion."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                kind = self.path.split("/")[1]
                status, body = {"401": (401, {"error": {"message": "invalid key"}}),
                                "404": (404, {"error": {"message": "model 'stub' not found"}})}.get(
                    kind, (200, {"hello": "world"}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # clients that hang up early are not news
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catalogue-base")
    make_teacher(root)
    make_corpus(root)
    return root


@pytest.fixture(scope="module")
def servers():
    bad = _BadServer()
    with StubServer() as stub:
        yield stub.base_url, bad.url
    bad.close()


def _snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, base, servers, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CATALOGUE_KEY", "sk-catalogue-test")
    monkeypatch.delenv("DISTILLERY_DEBUG", raising=False)
    # `generate` logs progress to the sys.stderr of its first call; in one process that stream is a closed capture
    monkeypatch.setattr(logging.getLogger("distillery.api"), "handlers", [])
    ctx = Ctx(base=base, tmp=tmp_path, stub=servers[0], bad_server=servers[1])
    argv = case.build(ctx)
    before = _snapshot(ctx.out)
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse
        status = exc.code
    finally:
        while HELD:  # the other run's lock (run-locked) ends with the case
            HELD.pop().close()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if not NOISE.search(ln)]
    assert status == case.status, err
    assert len(lines) == 1 and "Traceback" not in err, err
    message = lines[0]
    if case.status == 2:
        assert message.startswith("error: "), message
        message = message[len("error: "):]
    assert re.search(case.expect, message), message
    changed = {k for k, v in _snapshot(ctx.out).items() if before.get(k) != v}
    assert all(k.endswith(BOOKKEEPING + (".jsonl",)) for k in changed), f"left behind: {sorted(changed)}"
    for k in changed:  # what a failed command may write is bookkeeping, and complete
        if k.endswith(".json"):
            json.loads((ctx.out / k).read_text())
        if k.endswith(".jsonl"):
            [json.loads(line) for line in (ctx.out / k).read_text().splitlines()]
        if k.endswith(".yaml"):
            assert isinstance(yaml.safe_load((ctx.out / k).read_text()), dict)
    message = message.replace(str(tmp_path), "<dir>").replace(str(base), "<base>")
    message = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", message)
    SEEN[case.id] = re.sub(r"\(choose from '[^)]*\)", "(choose from <the verbs>)", message)  # verbs come and go


def render() -> str:
    """``docs/errors.md`` from the catalogue and the messages seen."""
    out = ["# What distillery says when the input is wrong", "",
           "Generated from the bad-input catalogue (`tests/bad_inputs.py`, run by `tests/test_bad_inputs.py`;",
           "regenerate with `.venv/bin/python scripts/gen_errors_doc.py`). Every message is one line on stderr,",
           "`error: ...` with exit status 2 (user error), unless the table says otherwise; nothing half-written",
           "is left behind. `<dir>` stands for the case's folder. Set `DISTILLERY_DEBUG=1` for a traceback.", ""]
    areas = {"cli": "Command line", "config": "Recipes and overrides", "data": "Training data", "model": "Models",
             "tokenizer": "Tokenizers", "cache": "Teacher caches", "api": "Served teacher (`distillery generate`)",
             "run": "Runs, resumes and outputs"}
    for area, title in areas.items():
        out += [f"## {title}", "", "| input | exit | message |", "|---|---|---|"]
        for c in (c for c in CASES if c.area == area):
            msg = SEEN[c.id].replace("|", "\\|")
            out.append(f"| {c.what} | {c.status} | `{msg}` |")
        out.append("")
    return "\n".join(out)


def test_errors_doc_is_current():
    missing = [c.id for c in CASES if c.id not in SEEN]
    if missing:
        pytest.skip(f"run the whole catalogue first ({len(missing)} cases not run)")
    text = render()
    if os.environ.get("DISTILLERY_WRITE_ERRORS_DOC"):
        DOC.write_text(text)
    assert len(CASES) >= 60
    assert DOC.is_file() and DOC.read_text() == text, "docs/errors.md is stale: run scripts/gen_errors_doc.py"
