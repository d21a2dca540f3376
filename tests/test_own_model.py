"""A user's own network, end to end (issue 22): docs/own-model.md executed as written.

The doc's blocks run in order in a fresh folder: ``python file=NAME`` blocks are written to
NAME, plain ``python`` blocks run here in one namespace (the documented API), the
``python deploy`` block runs in a fresh interpreter that cannot import splitlbi, and each
line of the ``bash`` block runs as ``python -m splitlbi ...``. Then: a small CNN with
BatchNorm, depthwise convs and residual adds, trained through the API and through
``--model module:factory``, cut to half the MACs, exported, and the ``.pt2`` on raw uint8
images scaled to [0, 1] scores exactly what the network it came from scores."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from helpers import NO_SPLITLBI, cli_environment

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "own-model.md"

pytestmark = pytest.mark.usefixtures("one_thread")

def doc_blocks() -> List[Tuple[str, str]]:
    """(info string, code) of every fenced block of docs/own-model.md, in order."""
    return [(info.strip(), code) for info, code in re.findall(r"```([^\n]*)\n(.*?)```", DOC.read_text("utf-8"), re.S)]


def _fresh_interpreter(code: str, cwd: Path) -> str:
    """Run ``code`` in a new Python that cannot import splitlbi; return its stdout."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", NO_SPLITLBI + code], capture_output=True, text=True, cwd=cwd,
                            timeout=600, env={**environment, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def _percent(pattern: str, text: str) -> List[str]:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return list(match.groups())


def test_the_doc_has_the_blocks_this_test_runs() -> None:
    infos = [info for info, _ in doc_blocks()]
    assert infos.count("python file=mynets.py") == 1 and "python deploy" in infos and "bash" in infos
    assert infos.count("python") >= 2


def test_own_network_from_the_docs_to_a_deployed_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    namespace: Dict[str, object] = {"__name__": "own_model_doc"}
    commands: List[str] = []
    deploy = ""
    try:
        for info, code in doc_blocks():
            if info.startswith("python file="):
                (tmp_path / info.split("=", 1)[1]).write_text(code, encoding="utf-8")
            elif info == "python":
                exec(compile(code, str(DOC), "exec"), namespace)
            elif info == "python deploy":
                deploy = code
            elif info == "bash":
                commands += [line for line in code.splitlines() if line.startswith("splitlbi ")]
    finally:
        sys.modules.pop("mynets", None)

    # -- the Python route: the documented API on the user's network
    result, dense, cut, tuned = namespace["result"], namespace["dense"], namespace["cut"], namespace["tuned"]
    accuracy, masked, test_x = namespace["accuracy"], namespace["masked"], namespace["test_x"]
    model = namespace["model"]
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"BatchNorm2d", "Conv2d"} <= kinds
    assert any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())  # depthwise
    assert dense > 80.0, dense
    assert result.reached and 0.48 <= result.macs_fraction <= 0.50, result
    assert str(result) == "\n".join(result.lines())
    assert cut == accuracy(masked, test_x)  # the compact network equals the masked one
    assert tuned > 80.0, tuned
    for suffix in (".pt2", ".state_dict.pt", ".pt"):
        assert (tmp_path / f"smallnet{suffix}").is_file()
    deployed = _percent(r"deployed: ([\d.]+)%", _fresh_interpreter(deploy, tmp_path))[0]
    assert deployed == f"{tuned:.2f}", (deployed, tuned)

    # -- the command line: --model module:factory, found again by masks, retrain, compact
    outputs = []
    for command in commands:
        arguments = shlex.split(command)[1:] + ["--no-progress"] * (shlex.split(command)[1] != "masks")
        done = subprocess.run([sys.executable, "-m", "splitlbi", *arguments], capture_output=True, text=True,
                              cwd=tmp_path, env=cli_environment(), timeout=900)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        outputs.append(done.stdout)
    assert '"model": "mynets:small_net"' in (tmp_path / "runs" / "small" / "config.json").read_text()
    achieved = float(_percent(r"achieved MACs ([\d.]+)%", outputs[1])[0])
    assert 48.0 <= achieved <= 50.0, outputs[1]
    report = outputs[-1]
    masked_cli, compact_cli, program_cli = _percent(
        r"test acc ([\d.]+)% \(masked\) -> ([\d.]+)% \(compact\) -> ([\d.]+)% \(smallnet-cli.pt2", report)
    assert masked_cli == compact_cli == program_cli, report
    assert "images scaled to [0, 1] (uint8 / 255)" in report and "rounds of medians" in report
    cli_deploy = deploy.replace("smallnet.pt2", "smallnet-cli.pt2")
    deployed_cli = _percent(r"deployed: ([\d.]+)%", _fresh_interpreter(cli_deploy, tmp_path))[0]
    assert deployed_cli == masked_cli, (deployed_cli, masked_cli)
    assert float(masked_cli) > 50.0, report  # a fine-tuned half-MACs network, well above chance (10%)
    with capsys.disabled():
        print(f"\nPython: dense {dense:.2f}%, cut to {100 * result.macs_fraction:.2f}% MACs {cut:.2f}%, fine-tuned "
              f"{tuned:.2f}%, deployed {deployed}%; command line: achieved MACs {achieved:.2f}%, masked "
              f"{masked_cli}% = compact {compact_cli}% = program {program_cli}%, deployed {deployed_cli}%")


_REGISTERED = '''
from torch import nn
from splitlbi.models import register_model


@register_model
def regnet_small(num_classes=10, in_channels=1):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, num_classes))
'''

_TRAIN = '''
import sys
from splitlbi.models import register_model
from splitlbi.train import TrainConfig, run_training
import regnets

@register_model
def script_net(num_classes=10, in_channels=1):  # registered in a script: __main__
    return regnets.regnet_small(num_classes, in_channels)

run_training(TrainConfig(model=sys.argv[1], dataset="digits", epochs=1, limit_train=64, limit_test=32, batch_size=32,
                         device="cpu", progress=False), sys.argv[2], log=None)
'''


def test_a_registered_model_is_found_by_later_commands(tmp_path: Path) -> None:
    """A run trained through run_training with a model registered in the user's module: config.json
    records the module and ``splitlbi masks`` imports it; one registered in a script cannot be
    found, says so, and ``--model module:factory`` supplies it."""
    from helpers import assert_one_line_error

    (tmp_path / "regnets.py").write_text(_REGISTERED)

    def run(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, cwd=tmp_path,
                              env=cli_environment(), timeout=600)

    for model, out in (("regnet_small", "run"), ("script_net", "script_run")):
        trained = run("-c", _TRAIN, model, out)
        assert trained.returncode == 0, trained.stderr
    assert '"model_module": "regnets"' in (tmp_path / "run" / "config.json").read_text()
    assert "model_module" not in (tmp_path / "script_run" / "config.json").read_text()
    found = run("-m", "splitlbi", "masks", "run", "--epoch", "1", "--out", "m.pt")
    assert found.returncode == 0, found.stderr
    assert_one_line_error(run("-m", "splitlbi", "masks", "script_run", "--epoch", "1", "--out", "s.pt"),
                          "unknown model 'script_net'", "package.module:factory")
    given = run("-m", "splitlbi", "masks", "script_run", "--epoch", "1", "--macs", "0.6", "--out", "s.pt",
                "--model", "regnets:regnet_small")
    assert given.returncode == 0, given.stderr
    assert_one_line_error(run("-m", "splitlbi", "masks", "run", "--epoch", "1", "--out", "x.pt", "--model",
                              "regnets:regnet_small"), "can be built here already")
