"""tools/bench_rl.py's summary: per-stage effects as mean and std over seeds, from hand-made runs."""
import pytest

from harness import load_tool


def _bench():
    return load_tool("bench_rl")


def _run(format_before, format_after, trigger_sft, acc_sft, acc_papo, generate=2.0):
    ev = {"bootstrap": {"npr_format_rate": format_before, "parallel_trigger_rate": format_before, "accuracy": 0.4},
          "dapo": {"npr_format_rate": format_after, "parallel_trigger_rate": format_after, "accuracy": 0.3},
          "sft": {"npr_format_rate": trigger_sft, "parallel_trigger_rate": trigger_sft, "accuracy": acc_sft},
          "papo": {"npr_format_rate": trigger_sft, "parallel_trigger_rate": trigger_sft, "accuracy": acc_papo}}
    split = {"generate": generate, "reward": 0.0, "train": 1.0, "sync": 0.0, "step": generate + 1.0}
    return {"eval": ev, "stage_seconds": {}, "step_time_s": {"dapo": split, "papo": split}}


def test_effects_are_mean_and_std_of_the_per_seed_differences():
    bench = _bench()
    out = bench.summarize({0: _run(0.4, 0.6, 0.9, 0.5, 0.6), 1: _run(0.4, 0.8, 0.7, 0.5, 0.4, generate=4.0)})
    dapo, sft, papo = (out["effects"][k] for k in ("dapo", "sft", "papo"))
    assert dapo["values"] == pytest.approx([0.2, 0.4]) and dapo["mean"] == pytest.approx(0.3)
    assert dapo["std"] == pytest.approx(0.1) and dapo["exceeds_std"]
    assert sft["values"] == pytest.approx([0.3, -0.1]) and sft["std"] == pytest.approx(0.2)
    assert not sft["exceeds_std"]  # mean 0.1 < std 0.2
    assert papo["mean"] == pytest.approx(0.0) and not papo["exceeds_std"]
    split = out["rl_step_time"]["dapo"]
    assert split["generate_s"] == pytest.approx(3.0) and split["step_s"] == pytest.approx(4.0)
    assert split["generate_share"] == pytest.approx(0.75) and split["train_share"] == pytest.approx(0.25)


def test_one_seed_is_refused():
    with pytest.raises(SystemExit):
        _bench().main(["--seeds", "0"])


def test_child_output_goes_to_stderr(capfd):
    """stdout carries the JSON only: the pipeline's prints and its children's go to stderr."""
    import subprocess
    import sys
    bench = _bench()
    with bench.stdout_to_stderr():
        print("table")
        subprocess.run([sys.executable, "-c", "print('child summary')"], check=True)
    print("json")
    out, err = capfd.readouterr()
    assert out == "json\n" and "table" in err and "child summary" in err
