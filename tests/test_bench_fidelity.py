"""bench/fidelity.py: stage plan, manifest, reuse/resume/redo logic (fake mctool) and a tiny real run."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import fidelity  # noqa: E402
from _stages import Completed, Lock, SubprocessRunner, has_option  # noqa: E402

# Options the fake mctool knows; the pending ones (step units, validation selection, best images) are absent.
KNOWN = "--grad --discrete --continuous --interior --eval-every --iterations --resume --beta --runs --epochs"


class FakeMctool:
    """Answers `mctool` commands as the real one does (files, --json), without training anything."""

    def __init__(self, interrupt: str | None = None, help_text: str = KNOWN, reject: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.interrupt_at = interrupt  # first call whose argv contains this string exits 130
        self.help_text, self.reject = help_text, reject
        self.ignores_labels = False  # an mctool that lists --labels but trains on the stored labels anyway

    def help(self, command: str) -> str:
        return self.help_text

    def interrupt(self) -> None:
        pass

    def run(self, argv: list[str], cwd: Path) -> Completed:
        self.calls.append(argv)
        cmd = argv[0]
        if self.reject and self.reject in argv:
            return Completed(2, "", f"Usage: mctool {cmd} [OPTIONS]\nError: No such option: {self.reject}\n")
        out = cwd / argv[argv.index("-o") + 1] if "-o" in argv else None
        if cmd == "distill" and "--resume" in argv:
            assert out is not None and out.exists(), "--resume without a product to continue"
        if cmd == "distill" and "--resume" not in argv:
            assert out is not None and not out.exists(), "a fresh distill must not find an earlier product"
        if self.interrupt_at and self.interrupt_at in " ".join(argv):
            self.interrupt_at = None
            if out is not None:
                out.write_text("partial")
            return Completed(130, "", "mctool: interrupted\n")
        if cmd == "inspect":
            per = [{"test_accuracy_last": a} for a in (0.88, 0.9)]
            return Completed(0, json.dumps({"experts": {"done": 2, "epochs": 4, "per_expert": per}}), "")
        if cmd == "evaluate":
            ipc = 10 if "abl-" in argv[1] else int(argv[1].split("ipc")[1].split(".")[0])
            base = {1: 0.70, 10: 0.82, 50: 0.86}[ipc] + (0.01 if "interior-0" in argv[1] else 0.0)
            # A learned-label synset scores soft (+0.04) unless evaluated with --labels hard (-0.02).
            learned = any(f"lever-{n}-" in argv[1] for n in ("labels", "all"))
            hard = not learned or ("--labels" in argv and not self.ignores_labels)
            base += 0.0 if not learned else -0.02 if hard else 0.04
            res = [{"kind": "synset", "model": "ConvNet", "mean": base, "std": 0.01, "accuracies": [base - 0.01, base + 0.01],
                    "epochs": int(argv[argv.index("--epochs") + 1]), "labels": "hard" if hard else "soft"}]
            if "--baseline" in argv:
                expert = "--baseline-labels" in argv and argv[argv.index("--baseline-labels") + 1] == "expert"
                mean = 0.6 if expert else 0.5
                res.append({"kind": "random-real", "model": "ConvNet", "mean": mean, "std": 0.02,
                            "accuracies": [mean - 0.02, mean + 0.02], "epochs": res[0]["epochs"],
                            "labels": "soft" if expert else "hard"})
            return Completed(0, json.dumps({"ipc": ipc, "results": res}), "")
        assert out is not None
        out.write_text(f"{cmd} done")
        return Completed(0, json.dumps({"file": out.name, "alpha": 0.01}), "")

    def names(self) -> list[str]:
        """Which products were made, in order (one per call)."""
        return [c[c.index("-o") + 1] if "-o" in c else f"{c[0]}:{c[1]}" for c in self.calls]


def run(tmp_path: Path, runner: FakeMctool, *extra: str) -> int:
    return fidelity.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "summary.json"),
                          *extra], runner=runner)


def manifest(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "work" / "manifest.json").read_text())


def test_plan_shares_stages_between_equal_settings() -> None:
    plan = fidelity.build_plan(fidelity.SIZES["default"])
    names = [s.name for s in plan.stages]
    assert len(names) == len(set(names))
    # grad constant, released step units (the default), images final, continuous starts, interior 2 and
    # beta mct are all the reference setting.
    ref_rows = [r for r in plan.rows if r["key"] == "ref"]
    assert {(r["factor"], r["value"]) for r in ref_rows} == {
        ("grad", "constant"), ("units", "released"), ("images", "final"), ("start", "continuous"), ("interior", 2),
        ("beta", "mct")}
    # One distillation per distinct setting: 17 rows, 5 of them the reference -> 13 distillations.
    assert sum(1 for n in names if n.startswith("abl-distill-")) == 12
    # The main convexified buffer (I = 2, mct) serves the main runs and the reference row; 7 variants more.
    convex = [s for s in plan.stages if s.command == "convexify"]
    assert [s.name for s in convex][0] == "convexify" and len(convex) == 1 + 4 + 3
    by = {s.name: s for s in plan.stages}
    assert by["abl-distill-interior-8"].deps == ("convexify-i8-mct",)
    assert "--baseline" in by["abl-evaluate-ref"].args and "--baseline" not in by["abl-evaluate-grad-adjoint"].args
    ev = by["evaluate-ipc50"].args
    assert ev[ev.index("--runs") + 1] == "5" and ev[ev.index("--epochs") + 1] == "1000" and "random" in ev
    assert by["distill-ipc10"].args[:2] == ("--preset", "fashion-mnist-ipc10")


def test_full_run_table_and_unavailable_rows(tmp_path: Path) -> None:
    fake = FakeMctool()
    assert run(tmp_path, fake) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    main = {m["ipc"]: m for m in summary["main"]}
    assert main[10]["distilled"]["mean"] == 82.0 and main[10]["random_real"]["mean"] == 50.0
    assert main[10]["gain"] == 32.0 and main[50]["gain"] == 36.0
    assert summary["experts"]["test_accuracy_last_mean"] == 89.0
    rows = {(a["factor"], a["value"]): a for a in summary["ablation"]}
    assert rows[("interior", 0)]["result"]["mean"] == 83.0 and rows[("interior", 2)]["result"]["mean"] == 82.0
    assert summary["goals"]["interior 2 >= interior 0"] == "not met"
    assert summary["goals"]["gain ipc 1 >= 15"] == "met"
    # Rows needing options this mctool lacks are reported, not run, and do not fail the benchmark.
    for key in [("units", "exact"), ("images", "best")]:
        assert rows[key]["result"] is None
        assert rows[key]["status"].startswith("not available in this mctool")
    # The quick size's experts (K = 4) cannot hold 8 interior waypoints: said so, nothing run.
    assert rows[("interior", 8)]["status"] == "needs experts of >= 9 epochs (K = 4)"
    assert not any("convex-i8-mct.h5" in c for c in fake.calls)
    assert not any("--step-units" in c or "--select-on" in c for c in fake.calls)
    m = manifest(tmp_path)
    e = m["stages"]["distill-ipc10"]
    assert e["status"] == "done" and e["command"][:2] == ["mctool", "distill"] and e["wall_s"] >= 0
    assert {"started", "ended", "wall_s", "loadavg_start", "rc"} <= set(e["attempts"][0])
    # A second run reuses everything: no mctool command but the summary's inspect.
    again = FakeMctool()
    assert run(tmp_path, again) == 0
    assert [c[0] for c in again.calls] == ["inspect"]


def test_interrupted_run_continues(tmp_path: Path) -> None:
    first = FakeMctool(interrupt="synset-ipc10.h5")
    assert run(tmp_path, first) == 130
    assert first.names()[-1] == "synset-ipc10.h5"
    assert manifest(tmp_path)["stages"]["distill-ipc10"]["status"] == "interrupted"
    second = FakeMctool()
    assert run(tmp_path, second) == 0
    # Finished stages are reused; the interrupted distillation continues with --resume.
    assert second.calls[0][0] == "distill" and "--resume" in second.calls[0]
    assert "buffer.h5" not in second.names() and "synset-ipc1.h5" not in second.names()
    e = manifest(tmp_path)["stages"]["distill-ipc10"]
    assert e["status"] == "done" and [a["resumed"] for a in e["attempts"]] == [False, True]


def test_summary_runs_no_stage(tmp_path: Path) -> None:
    """`--summary` writes the tables of what the folder holds (a sitting without --only would run
    every stage still to run): nothing but the experts' inspect, no new sitting; a folder that is
    no benchmark's is refused."""
    assert run(tmp_path, FakeMctool(interrupt="abl-")) == 130  # the main rows done, the ablation's to run
    sittings = len(manifest(tmp_path)["sittings"])
    fake = FakeMctool()
    assert run(tmp_path, fake, "--summary") == 0
    assert [c[0] for c in fake.calls] == ["inspect"]
    assert len(manifest(tmp_path)["sittings"]) == sittings
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(m["distilled"] is not None for m in summary["main"])
    assert summary["ablation"] and all(a["result"] is None for a in summary["ablation"])
    with pytest.raises(SystemExit) as e:
        fidelity.main(["--quick", "--work", str(tmp_path / "none"), "--summary"], runner=FakeMctool())
    assert e.value.code == 2 and not (tmp_path / "none").exists()


def test_changed_setting_reruns_that_stage_and_what_depends_on_it(tmp_path: Path) -> None:
    assert run(tmp_path, FakeMctool(), "--no-ablation") == 0
    fake = FakeMctool()
    assert run(tmp_path, fake, "--no-ablation", "--iterations", "10=77") == 0
    assert fake.names() == ["synset-ipc10.h5", "evaluate:synset-ipc10.h5", "inspect:buffer.h5"]
    assert "77" in fake.calls[0]
    stale = list((tmp_path / "work" / "stale").iterdir())
    assert sorted(p.name.rsplit("-", 1)[0] for p in stale) == ["eval-ipc10", "synset-ipc10"]
    # A change upstream (the experts) reruns everything below it.
    fake = FakeMctool()
    assert run(tmp_path, fake, "--no-ablation", "--iterations", "10=77", "--epochs", "5") == 0
    assert len(fake.calls) == 1 + 1 + 3 + 3 + 1


def test_resume_that_cannot_continue_starts_over(tmp_path: Path) -> None:
    assert run(tmp_path, FakeMctool(interrupt="synset-ipc1.h5"), "--no-ablation") == 130

    class Finished(FakeMctool):
        def run(self, argv: list[str], cwd: Path) -> Completed:
            if "--resume" in argv:
                self.calls.append(argv)
                return Completed(2, "", "mctool: error: synset 'ipc1' has no checkpoint to resume from\n")
            return super().run(argv, cwd)

    fake = Finished()
    assert run(tmp_path, fake, "--no-ablation") == 0
    assert "--resume" in fake.calls[0] and "--resume" not in fake.calls[1]
    assert manifest(tmp_path)["stages"]["distill-ipc1"]["status"] == "done"


def test_unknown_option_at_run_time_is_not_available(tmp_path: Path) -> None:
    # --help lists the option but the command still refuses it (e.g. a value): reported, not a failure.
    fake = FakeMctool(reject="--discrete")
    assert run(tmp_path, fake) == 0
    rows = {(a["factor"], a["value"]): a for a in json.loads((tmp_path / "summary.json").read_text())["ablation"]}
    assert rows[("start", "discrete")]["status"].startswith("not available in this mctool")


def test_failed_stage_exits_1_and_is_retried(tmp_path: Path) -> None:
    class Broken(FakeMctool):
        def run(self, argv: list[str], cwd: Path) -> Completed:
            if argv[0] == "convexify":
                self.calls.append(argv)
                return Completed(1, "", "mctool: error: disk full\n")
            return super().run(argv, cwd)

    assert run(tmp_path, Broken(), "--no-ablation") == 1
    m = manifest(tmp_path)["stages"]
    assert m["convexify"]["status"] == "failed" and m["convexify"]["error"] == "mctool: error: disk full"
    assert m["distill-ipc1"]["status"] == "blocked"
    fake = FakeMctool()
    assert run(tmp_path, fake, "--no-ablation") == 0
    assert fake.names()[0] == "convex-i2-mct.h5"


def test_work_folder_guards(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with Lock(work):
        assert run(tmp_path, FakeMctool()) == 2  # busy
    assert run(tmp_path, FakeMctool(), "--stop-after", "experts") == 0
    with pytest.raises(SystemExit):  # another size in the same folder
        fidelity.main(["--size", "default", "--work", str(work)], runner=FakeMctool())
    with pytest.raises(SystemExit):
        fidelity.main(["--quick", "--work", str(work), "--only", "nope"], runner=FakeMctool())


def test_adopt_takes_finished_stages_of_a_copy_with_the_same_lineage(tmp_path: Path) -> None:
    import shutil

    assert run(tmp_path, FakeMctool(), "--no-ablation") == 0
    work, copy = tmp_path / "work", tmp_path / "copy"
    shutil.copytree(work, copy)
    lane = FakeMctool()  # a second sitting on the copy runs one ablation row
    assert fidelity.main(["--quick", "--work", str(copy), "--out", str(tmp_path / "c.json"),
                          "--only", "abl-evaluate-interior-0"], runner=lane) == 0
    assert "abl-interior-0.h5" in lane.names()
    (work / "abl-interior-0.h5").write_text("partial")  # this folder's interrupted try of the same row
    fake = FakeMctool()
    assert run(tmp_path, fake, "--adopt", str(copy), "--only", "abl-evaluate-interior-0") == 0
    assert "abl-interior-0.h5" not in fake.names(), "the row was run again instead of taken"
    assert (work / "abl-interior-0.h5").read_text() == "distill done"
    assert [p.name.split("-")[0] for p in (work / "stale").iterdir()] == ["abl"]  # the partial one kept aside
    m = manifest(tmp_path)
    assert m["stages"]["abl-evaluate-interior-0"]["adopted_from"] == str(copy)
    assert set(m["sittings"][-1]["adopted"][str(copy)]) == {"convexify-i0-mct", "abl-distill-interior-0",
                                                             "abl-evaluate-interior-0"}
    rows = {(a["factor"], a["value"]): a for a in json.loads((tmp_path / "summary.json").read_text())["ablation"]}
    assert rows[("interior", 0)]["result"]["mean"] == 83.0
    # A copy whose experts are another run's (other attempts) gives nothing: its rows were made from other inputs.
    other = json.loads((copy / "manifest.json").read_text())
    other["stages"]["experts"]["attempts"][0]["started"] = "another run"
    (copy / "manifest.json").write_text(json.dumps(other))
    assert fidelity.main(["--quick", "--work", str(copy), "--out", str(tmp_path / "c.json"),
                          "--only", "abl-evaluate-interior-1"], runner=FakeMctool()) == 0
    fake = FakeMctool()
    assert run(tmp_path, fake, "--adopt", str(copy), "--only", "abl-evaluate-interior-1") == 0
    assert "abl-interior-1.h5" in fake.names(), "a row of other experts was taken"
    with pytest.raises(SystemExit):
        run(tmp_path, FakeMctool(), "--adopt", str(tmp_path / "nowhere"))


def test_has_option() -> None:
    text = "│ --grad  <str> ...\n│ --eval-every <int>\n│ --discrete  --continuous"
    assert has_option(text, "--grad") and has_option(text, "--continuous") and has_option(text, "--eval-every")
    assert not has_option(text, "--eval") and not has_option(text, "--gra") and not has_option(text, "--select-on")


def test_subprocess_runner_forwards_one_sigint(tmp_path: Path) -> None:
    # A stand-in "python" that reports its arguments and, on SIGINT, saves and exits 130 as mctool does.
    fake_python = tmp_path / "python"
    fake_python.write_text(textwrap.dedent("""\
        #!/bin/sh
        trap 'echo saved; exit 130' INT
        echo "$@"
        kill -USR1 $PPID
        for i in $(seq 200); do sleep 0.05; done
        exit 1
        """))
    fake_python.chmod(0o755)
    runner = SubprocessRunner(str(fake_python), dict(os.environ))
    old = signal.signal(signal.SIGUSR1, lambda *a: runner.interrupt())
    try:
        done = runner.run(["distill", "--json"], tmp_path)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert done.rc == 130 and done.stdout.split() == ["-m", "mctool", "distill", "--json", "saved"]


class InProcess:
    """Runs the real mctool CLI in this process (torch imported once: the smoke test stays fast)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def help(self, command: str) -> str:
        from tests.conftest import cli

        return cli(command, "--help").output

    def interrupt(self) -> None:
        pass

    def run(self, argv: list[str], cwd: Path) -> Completed:
        from tests.conftest import cli

        self.calls.append(argv)
        here = os.getcwd()
        os.chdir(cwd)
        try:
            r = cli(*argv)
        finally:
            os.chdir(here)
        return Completed(r.exit_code, r.stdout, r.stderr)


def test_tiny_real_pipeline(tmp_path: Path, data_dir: Path) -> None:
    runner = InProcess()
    args = ["--quick", "--dataset", "mnist", "--preset", "none", "--data-dir", str(data_dir), "--device", "cpu",
            "--distill-args", "--syn-steps 2 --expert-epochs 1 --max-start-epoch 1",
            "--width", "8", "--experts", "2", "--epochs", "3", "--iterations", "3", "--eval-runs", "1",
            "--eval-epochs", "2", "--abl-iterations", "2", "--abl-eval-runs", "1", "--abl-eval-epochs", "2",
            "--only", "evaluate-ipc1", "abl-evaluate-ref", "abl-evaluate-interior-1"]
    assert run(tmp_path, runner, *args) == 0, runner.calls
    summary = json.loads((tmp_path / "summary.json").read_text())
    ipc1 = summary["main"][0]
    assert ipc1["status"] == "done" and ipc1["distilled"]["runs"] == 1 and ipc1["random_real"] is not None
    assert 0 <= ipc1["distilled"]["mean"] <= 100 and ipc1["learned_lr"] > 0
    rows = {(a["factor"], a["value"]): a for a in summary["ablation"]}
    assert rows[("interior", 1)]["result"] is not None and rows[("grad", "constant")]["result"] is not None
    assert summary["random_real_ablation_protocol"] is not None
    assert summary["experts"]["done"] == 2 and summary["experts"]["epochs"] == 3
    assert (tmp_path / "work" / "convex-i1-mct.h5").exists()


def test_lever_rows_pass_each_lever_and_record_time_per_iteration(tmp_path: Path) -> None:
    """--lever rows: the reference 'mct' (with random real) and each lever at each --lever-ipc, with
    the lever's options; a lever whose option this mctool lacks is reported, not run."""
    size = fidelity.resolve_size(fidelity.parser().parse_args(
        ["--quick", "--no-ablation", "--lever", "window+ema", "--lever", "batch-syn-100", "--lever-ipc", "10",
         "--lever-ipc", "50", "--lever-iterations", "40"]), fidelity.SIZES)
    plan = fidelity.build_plan(size)
    by = {s.name: s for s in plan.stages}
    assert [(r["lever"], r["ipc"]) for r in plan.levers] == [
        (lever, ipc) for ipc in (10, 50) for lever in ("mct", "window+ema", "batch-syn-100")]
    args = by["lever-window+ema-ipc50-distill"].args
    assert args[:2] == ("--preset", "fashion-mnist-ipc50") and args[args.index("--ema") + 1] == "0.875"
    assert args[args.index("--start-upper-iterations") + 1] == "20" and args[args.index("--iterations") + 1] == "40"
    assert "--batch-syn" not in by["lever-mct-ipc10-distill"].args
    assert "--baseline" in by["lever-mct-ipc10-evaluate"].args
    assert "--baseline" not in by["lever-batch-syn-100-ipc10-evaluate"].args

    fake = FakeMctool(help_text=KNOWN + " --start-upper-init --batch-syn")  # no --ema: that row is unavailable
    extra = ["--no-ablation", "--lever", "window+ema", "--lever", "batch-syn-100", "--lever-iterations", "40"]
    assert run(tmp_path, fake, *extra) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {(r["lever"], r["ipc"]): r for r in summary["levers"]}
    assert set(rows) == {("mct", 10), ("window+ema", 10), ("batch-syn-100", 10)}
    assert rows[("batch-syn-100", 10)]["gain_over_random"] == 32.0
    assert rows[("batch-syn-100", 10)]["wall_s_per_iteration"] is not None
    assert rows[("window+ema", 10)]["result"] is None
    assert rows[("window+ema", 10)]["status"].startswith("not available in this mctool: distill --ema")
    assert any("--batch-syn" in c for c in fake.calls) and not any("--ema" in c for c in fake.calls)
    table = fidelity.render(summary)
    assert "| --batch-syn 100 | hard | 10 | 82.00 ± 1.00 | 50.00 ± 2.00 | +32.00 | 0.00 | done |" in table


def test_label_levers_are_scored_with_hard_and_soft_labels_apart(tmp_path: Path) -> None:
    """A lever that learns labels gets one more stage, `...-evaluate-hard` (`evaluate --labels hard`, no
    baseline), and two summary rows: soft against its own expert-labelled random real, hard against the
    mct row's. The stages that were there before keep their arguments (a stage's fingerprint is its
    arguments: a running benchmark must not redo them)."""
    argv = ["--quick", "--no-ablation", "--lever", "labels", "--lever", "ema", "--lever", "all",
            "--lever-iterations", "40"]
    plan = fidelity.build_plan(fidelity.resolve_size(fidelity.parser().parse_args(argv), fidelity.SIZES))
    by = {s.name: s for s in plan.stages}
    hard = sorted(n for n in by if n.endswith("-evaluate-hard"))
    assert hard == ["lever-all-ipc10-evaluate-hard", "lever-labels-ipc10-evaluate-hard"]
    assert [r["evaluate_hard"] for r in plan.levers] == [None, "lever-labels-ipc10-evaluate-hard", None,
                                                         "lever-all-ipc10-evaluate-hard"]
    h = by["lever-labels-ipc10-evaluate-hard"]
    assert (h.command, h.args, h.product, h.deps, h.requires) == (
        "evaluate", ("lever-labels-ipc10.h5", "--labels", "hard", "--runs", "2", "--epochs", "100", "--seed", "0",
                     "--no-save"), "lever-labels-ipc10-hard.json", ("lever-labels-ipc10-distill",), ("--labels",))
    # The arguments of the stages a benchmark may be running with, as they were before the hard stage came.
    assert by["lever-labels-ipc10-distill"].args == (
        "--preset", "fashion-mnist-ipc10", "--learn-labels", "--buffer", "convex-i2-mct.h5", "-o",
        "lever-labels-ipc10.h5", "--name", "lever-labels-ipc10", "--iterations", "40", "--seed", "0")
    assert by["lever-labels-ipc10-evaluate"].args == (
        "lever-labels-ipc10.h5", "--runs", "2", "--epochs", "100", "--baseline", "random", "--baseline-labels",
        "expert", "--buffer", "convex-i2-mct.h5", "--seed", "0", "--no-save")
    assert by["lever-labels-ipc10-evaluate"].product == "lever-labels-ipc10.json"
    assert by["lever-mct-ipc10-evaluate"].args == (
        "lever-mct-ipc10.h5", "--runs", "2", "--epochs", "100", "--baseline", "random", "--seed", "0", "--no-save")
    assert by["lever-ema-ipc10-evaluate"].args == (
        "lever-ema-ipc10.h5", "--runs", "2", "--epochs", "100", "--seed", "0", "--no-save")

    both = KNOWN + " --learn-labels --ema --start-upper-init --labels --baseline-labels"
    fake = FakeMctool(help_text=both)
    assert run(tmp_path, fake, *argv[1:]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {(r["lever"], r["labels"]): r for r in summary["levers"]}
    assert [(r["lever"], r["labels"]) for r in summary["levers"]] == [
        ("mct", "hard"), ("labels", "soft"), ("labels", "hard"), ("ema", "hard"), ("all", "soft"), ("all", "hard")]
    soft, hard_row = rows[("labels", "soft")], rows[("labels", "hard")]
    assert (soft["result"]["mean"], soft["random_real"]["mean"], soft["random_real_labels"]) == (86.0, 60.0, "soft")
    assert soft["gain_over_random"] == 26.0
    assert (hard_row["result"]["mean"], hard_row["random_real"]["mean"], hard_row["random_real_labels"]) == (
        80.0, 50.0, "hard")
    assert hard_row["gain_over_random"] == 30.0 and hard_row["status"] == "done"
    assert rows[("ema", "hard")]["random_real"]["mean"] == 50.0 and rows[("mct", "hard")]["gain_over_random"] == 32.0
    assert soft["wall_s_per_iteration"] == hard_row["wall_s_per_iteration"] is not None  # one distillation
    assert sum("--labels" in c for c in fake.calls) == 2
    table = fidelity.render(summary)
    assert "| learned soft labels (DATM) | soft | 10 | 86.00 ± 1.00 | 60.00 ± 2.00 | +26.00 |" in table
    assert "| learned soft labels (DATM) | hard | 10 | 80.00 ± 1.00 | 50.00 ± 2.00 | +30.00 |" in table
    # An mctool without `evaluate --labels`: the hard rows say so; the soft ones stand.
    fake = FakeMctool(help_text=KNOWN + " --learn-labels --ema --start-upper-init --baseline-labels")
    assert run(tmp_path / "older", fake, *argv[1:]) == 0
    older = json.loads((tmp_path / "older" / "summary.json").read_text())
    rows = {(r["lever"], r["labels"]): r for r in older["levers"]}
    assert rows[("labels", "hard")]["result"] is None and rows[("labels", "soft")]["result"] is not None
    assert rows[("labels", "hard")]["status"].startswith("not available in this mctool: evaluate --labels")
    # An mctool that lists --labels but trains on soft labels anyway: its "hard" rows are not hard scores.
    fake = FakeMctool(help_text=both)
    fake.ignores_labels = True
    assert run(tmp_path / "ignoring", fake, *argv[1:]) == 0
    ignoring = json.loads((tmp_path / "ignoring" / "summary.json").read_text())
    rows = {(r["lever"], r["labels"]): r for r in ignoring["levers"]}
    assert rows[("labels", "hard")]["result"] is None and rows[("labels", "soft")]["result"] is not None
    assert rows[("labels", "hard")]["status"] == "trained on soft labels, not hard"
