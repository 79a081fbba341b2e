"""The fault suite of `run`, `run --resume`, `plot` and `slerp-line`: every bad input kind (malformed,
missing, mismatched, non-finite, unwritable) exits with status 2 and one line naming the file or key, and
leaves nothing behind. (`merge` and the language-model inputs have their own files: test_faults_merge.py,
test_faults_llm.py; kills and corrupt checkpoints: test_faults.py, test_faults_llm_kill.py.)"""

import json
import pathlib
import shutil

import pytest

from cli_helpers import assert_refused, run_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments/digits/m2n2.yaml"
TINY = ["--no-progress", "--set", "problem.model.hidden_sizes=[8]", "--set", "run.evaluations=202",
        "--set", "run.log_every=100", "--set", "run.checkpoint_every=100", "--set", "run.seeds=[1]"]
UNWRITABLE = pathlib.Path("/proc/evojax-merge-test")  # refuses new files even for root


def _file(tmp, name, content):
    path = tmp / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# Each case: tmp_path -> (arguments, words the error line must name, paths that must not exist after).
RUN_CASES = {
    "config missing": lambda t: (["run", t / "nope.yaml"], ["nope.yaml"], []),
    "config empty": lambda t: (["run", _file(t, "e.yaml", ""), "--out", t / "o"], ["e.yaml", "empty"], [t / "o"]),
    "config a list": lambda t: (["run", _file(t, "l.yaml", "- 1\n"), "--out", t / "o"], ["l.yaml", "mapping"], [t / "o"]),
    "config not YAML": lambda t: (["run", _file(t, "b.yaml", "run: [1,\n"), "--out", t / "o"], ["b.yaml", "line 2"], [t / "o"]),
    "config binary": lambda t: (["run", _file(t, "x.yaml", b"\x80\x81\xfe"), "--out", t / "o"], ["x.yaml", "UTF-8"], [t / "o"]),
    "config a folder": lambda t: (["run", t, "--out", t / "o"], [str(t)], [t / "o"]),
    "unknown key": lambda t: (["run", DIGITS, *TINY, "--out", t / "o", "--set", "run.speed=3"], ["speed"], [t / "o"]),
    "wrong type": lambda t: (["run", DIGITS, *TINY, "--out", t / "o", "--set", "run.evaluations=many"], ["run.evaluations"], [t / "o"]),
    "impossible value": lambda t: (["run", DIGITS, *TINY, "--out", t / "o", "--set", "strategy.alpha=-2"], ["strategy.alpha"], [t / "o"]),
    "NaN value": lambda t: (["run", DIGITS, *TINY, "--out", t / "o", "--set", "strategy.alpha=.nan"], ["strategy.alpha", "finite"], [t / "o"]),
    "huge integer": lambda t: (["run", DIGITS, *TINY, "--out", t / "o", "--set", "run.evaluations=1e30"], ["run.evaluations"], [t / "o"]),
    "seed out of range": lambda t: (["run", DIGITS, *TINY, "--out", t / "o", "--set", "run.seeds=[-1]"], ["run.seeds"], [t / "o"]),
    "run name not a file name": lambda t: (["run", DIGITS, *TINY, "--set", "name=a/b"], ["name"], []),
    "override without =": lambda t: (["run", DIGITS, *TINY, "--out", t / "o", "--set", "run.seeds"], ["run.seeds"], [t / "o"]),
    "override bad YAML": lambda t: (["run", DIGITS, *TINY, "--out", t / "o", "--set", "run.seeds=[1"], ["run.seeds", "YAML"], [t / "o"]),
    "budget inside the warm-up": lambda t: (["run", DIGITS, *TINY, "--out", t / "o", "--set", "strategy.warmup=300",
                                             "--set", "run.log_every=1", "--set", "run.checkpoint_every=1"],
                                            ["run.evaluations", "warm-up"], [t / "o"]),
    "budget not a whole generation": lambda t: (["run", DIGITS, *TINY, "--out", t / "o", "--set", "run.evaluations=2"],
                                                ["run.evaluations"], [t / "o"]),
    "missing dataset": lambda t: (["run", DIGITS, *TINY, "--out", t / "o", "--set", "problem.data.name=idx",
                                   "--set", f"problem.data.path={t / 'absent'}"], ["absent"], [t / "o"]),
    "unknown problem": lambda t: (["run", DIGITS, *TINY, "--out", t / "o", "--set", "problem.name=nope"], ["problem"], [t / "o"]),
    "out under a file": lambda t: (["run", DIGITS, *TINY, "--out", _file(t, "f", "") / "run"], ["f/run", "is a file"], []),
    "out is a file": lambda t: (["run", DIGITS, *TINY, "--out", _file(t, "f", "")], ["exists and is not a folder"], []),
    "out unwritable": lambda t: (["run", DIGITS, *TINY, "--out", UNWRITABLE / "run"], [str(UNWRITABLE)], [UNWRITABLE]),
    "resume of nothing": lambda t: (["run", "--resume", t / "absent"], ["absent", "not a run directory"], [t / "absent"]),
    "resume of a file": lambda t: (["run", "--resume", _file(t, "f", "")], ["not a run directory"], []),
    "resume with a config": lambda t: (["run", DIGITS, "--resume", t], [], []),
    "no config": lambda t: (["run"], [], []),
}


def _garbled_metrics(t, text):
    run = t / "garbled"
    run.mkdir()
    shutil.copy(ROOT / "experiments/digits/results/m2n2/config.yaml", run / "config.yaml")
    (run / "metrics.csv").write_text(text)
    return run


PLOT_CASES = {
    "missing run": lambda t: (["plot", t / "nothing", "--out", t / "p.png"], ["nothing"], [t / "p.png"]),
    "ragged metrics": lambda t: (["plot", _garbled_metrics(t, "seed,evaluations,test_score\n1,2\n"), "--out", t / "p.png"],
                                 ["metrics.csv"], [t / "p.png"]),
    "metrics without columns": lambda t: (["plot", _garbled_metrics(t, "seed,foo\n"), "--out", t / "p.png"],
                                          ["metrics.csv", "test_score"], [t / "p.png"]),
    "line not JSON": lambda t: (["plot", "--panel", "T", ROOT / "experiments/digits/results/m2n2",
                                 _file(t, "l.json", "{"), "--out", t / "p.png"], ["l.json"], [t / "p.png"]),
    "line without its keys": lambda t: (["plot", "--panel", "T", ROOT / "experiments/digits/results/m2n2",
                                         _file(t, "l.json", '{"label": 3}'), "--out", t / "p.png"], ["l.json"], [t / "p.png"]),
    "line missing": lambda t: (["plot", "--panel", "T", ROOT / "experiments/digits/results/m2n2", t / "l.json",
                                "--out", t / "p.png"], ["l.json"], [t / "p.png"]),
    "figure unwritable": lambda t: (["plot", ROOT / "experiments/digits/results/m2n2", "--out", UNWRITABLE / "p.png"],
                                    [str(UNWRITABLE)], []),
    "figure under a file": lambda t: (["plot", ROOT / "experiments/digits/results/m2n2", "--out", _file(t, "f", "") / "p.png"],
                                      ["is a file"], []),
    "figure is a folder": lambda t: (["plot", ROOT / "experiments/digits/results/m2n2", "--out", t], ["is a folder"], []),
    "table unwritable": lambda t: (["plot", ROOT / "experiments/digits/results/m2n2", "--out", t / "p.png",
                                    "--table", UNWRITABLE / "t.md"], [str(UNWRITABLE)], [t / "p.png"]),
    "runs of different methods": lambda t: (["plot", _two_methods(t), "--out", t / "p.png"], ["same method"], [t / "p.png"]),
    "no runs and no panels": lambda t: (["plot", "--out", t / "p.png"], [], [t / "p.png"]),
}


def _two_methods(t):
    folder = t / "mixed"
    for name in ("m2n2", "ga"):
        shutil.copytree(ROOT / f"experiments/digits/results/{name}", folder / name,
                        ignore=shutil.ignore_patterns("best", "checkpoints", "*.png"))
    return folder


SLERP_LINE_CASES = {
    "out unwritable": lambda t: (["slerp-line", ROOT / "experiments/digits/pretrained/m2n2.yaml", "--out",
                                  UNWRITABLE / "l.json", "--ratios", "3"], [str(UNWRITABLE)], []),
    "out under a file": lambda t: (["slerp-line", ROOT / "experiments/digits/pretrained/m2n2.yaml", "--out",
                                    _file(t, "f", "") / "l.json", "--ratios", "3"], ["is a file"], []),
    "one ratio": lambda t: (["slerp-line", ROOT / "experiments/digits/pretrained/m2n2.yaml", "--out", t / "l.json",
                             "--ratios", "1"], ["--ratios"], [t / "l.json"]),
    "config missing": lambda t: (["slerp-line", t / "nope.yaml", "--out", t / "l.json"], ["nope.yaml"], [t / "l.json"]),
    "config bad value": lambda t: (["slerp-line", ROOT / "experiments/digits/pretrained/m2n2.yaml", "--out", t / "l.json",
                                    "--set", "run.seeds=[]"], ["run.seeds"], [t / "l.json"]),
}

CASES = {f"run: {k}": v for k, v in RUN_CASES.items()} | {f"plot: {k}": v for k, v in PLOT_CASES.items()} \
    | {f"slerp-line: {k}": v for k, v in SLERP_LINE_CASES.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_left_behind(case, tmp_path, capsys):
    args, mentions, absent = CASES[case](tmp_path)
    result = run_main(capsys, *args)
    if result.stderr.count("error:") == 1 and "usage:" in result.stderr:  # argparse's own usage errors
        assert result.returncode == 2 and "Traceback" not in result.stderr
        return
    assert_refused(result, *mentions, absent=absent)


def test_a_run_that_fails_before_its_first_result_removes_the_folders_made_for_it(tmp_path, capsys, monkeypatch):
    from evojax_merge.errors import DataError
    from evojax_merge.run import runner

    def fails(*args, **kwargs):
        raise DataError("the data went away")

    monkeypatch.setattr(runner, "run", fails)
    out = tmp_path / "new" / "deeper" / "run"
    assert_refused(run_main(capsys, "run", DIGITS, *TINY, "--out", out), "went away", absent=[tmp_path / "new"])

    own = tmp_path / "mine"  # a user's own empty folder stays, and stays empty
    own.mkdir()
    assert_refused(run_main(capsys, "run", DIGITS, *TINY, "--out", own), "went away")
    assert own.is_dir() and list(own.iterdir()) == []


def test_a_non_empty_out_folder_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_refused(run_main(capsys, "run", DIGITS, *TINY, "--out", out), "--resume")
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_run_files_are_readable_by_others_as_the_umask_says(tmp_path, capsys):
    import os
    import stat

    old = os.umask(0o022)
    try:
        from evojax_merge.files import umask

        umask.cache_clear()
        assert run_main(capsys, "run", DIGITS, *TINY, "--out", tmp_path / "r").returncode == 0
    finally:
        os.umask(old)
        umask.cache_clear()
    for name in ("config.yaml", "metrics.csv", "summary.json", "test_score.png"):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == 0o644, name
