"""The commands that measure: ``profile`` (where the time goes, in Caffe or a deployment runtime) and ``plan``
(which merges pay, by time and by accuracy risk). Library: ``deeprebirth.measure``, ``deeprebirth.plan``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from deeprebirth import api
from deeprebirth.cli import render
from deeprebirth.cli.options import declared_options, risk_progress, user_errors


@click.command("profile")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@declared_options(api.PROFILE_OPTIONS)
@user_errors
def profile_command(prototxt: str, weights: str | None, batch: int | None, threads: int, rounds: int, warmup: int,
                    compare_prototxt: str | None, compare_weights: str | None, plot_path: str | None,
                    json_path: str | None, top: int, clock: str, seed: int, runtime: str | None,
                    gpu: int | None) -> None:
    """Time every layer of PROTOTXT in real Caffe (OpenCV dnn where pycaffe is not importable): per layer, per
    type, the non-tensor share, and memory; or, with --runtime, in another runtime: per layer in OpenCV dnn, ONNX
    Runtime and MNN (their own per-op times), whole forward passes in ncnn and with --compare (interleaved with
    --compare's net)."""

    if compare_weights and not compare_prototxt:
        raise api.DeepRebirthError("--compare-weights needs --compare")
    if runtime in (None, "caffe"):
        runtime = api.pick_reference("caffe" if gpu is not None else runtime)  # no --runtime: the reference
    nets = [(prototxt, weights)] + ([(compare_prototxt, compare_weights)] if compare_prototxt else [])
    timing: dict[str, Any] = {"batch": batch, "threads": threads, "rounds": rounds, "warmup": warmup, "seed": seed,
                              "clock": clock}
    if runtime in api.LAYER_TIMED and not compare_prototxt:
        _runtime_layers(prototxt, weights, runtime, top=top, plot_path=plot_path, json_path=json_path, **timing)
        return
    if runtime != "caffe":
        _runtime_latency(nets, runtime, plot_path=plot_path, json_path=json_path, **timing)
        if not compare_prototxt:
            click.echo(f"no per-layer times in {runtime}: {api.NOT_LAYER_TIMED[runtime]}")
        return
    profiles = [api.profile_net(path, model, batch=batch, threads=threads, rounds=rounds, warmup=warmup, seed=seed,
                            clock=clock, gpu=gpu) for path, model in nets]
    click.echo(render.profile_text(profiles, top))
    labels = ["before", "after"] if len(profiles) == 2 else [profiles[0].prototxt.rsplit("/", 1)[-1]]
    if plot_path:
        api.plot_by_type(profiles, labels, plot_path)
        click.echo(f"wrote {plot_path}")
    if json_path:
        api.save_profiles(json_path, profiles)
        click.echo(f"wrote {json_path}")


def _runtime_layers(prototxt: str, weights: str | None, runtime: str, *, top: int, plot_path: str | None,
                    json_path: str | None, **timing: Any) -> None:
    if plot_path:
        raise api.DeepRebirthError("--plot needs --runtime caffe (the per-layer profile)")
    p = api.profile_on_runtime(prototxt, weights, runtime, **timing)
    click.echo("\n".join(p.describe()))
    click.echo(render.type_table(p))
    click.echo(render.slowest_table(p, top))
    if json_path:
        api.save_runtime_profile(json_path, p)
        click.echo(f"wrote {json_path}")


def _runtime_latency(nets: Sequence[tuple[str, str | None]], runtime: str, *, plot_path: str | None,
                     json_path: str | None, **timing: Any) -> None:
    if plot_path:
        raise api.DeepRebirthError("--plot needs --runtime caffe (the per-layer profile)")
    times = api.latency(nets, runtime, **timing)
    click.echo(render.latency_text(nets, runtime, timing, times))
    if json_path:
        api.save_latency(json_path, runtime, timing, nets, times)
        click.echo(f"wrote {json_path}")


def _runtime_plan(prototxt: str, weights: str | None, runtime: str, *, json_path: str | None, **timing: Any) -> None:
    plan = api.plan_on_runtime(prototxt, weights, runtime, **timing)
    click.echo(render.runtime_plan_text(prototxt, weights, runtime, plan))
    if json_path:
        api.save_runtime_plan(json_path, plan)
        click.echo(f"wrote {json_path}")


@click.command("plan")
@click.argument("prototxt", type=click.Path(dir_okay=False))
@declared_options(api.PLAN_OPTIONS)
@user_errors
def plan_command(prototxt: str, weights: str | None, batch: int | None, threads: int, rounds: int,
                 json_path: str | None, rules: str, clock: str, seed: int, data: str | None, risk_budget: str,
                 budget: str | None, max_drop: float | None, runtime: str | None, reference: str | None,
                 **settings: Any) -> None:
    """List every merge the rules could make in PROTOTXT, with measured time, MACs and memory saved, and risk."""

    if data is not None and weights is None:
        raise api.DeepRebirthError("measuring the accuracy risk needs the trained weights (--weights)", file=prototxt)
    if (max_drop is not None or budget is not None) and data is None:
        raise api.DeepRebirthError("--max-drop and --budget need --data (images to measure the risks on)")
    if data is not None:
        api.require_pycaffe("plan --data (the accuracy risk: a short fine-tuning)")
    if runtime not in (None, "caffe"):
        if data is not None:
            raise api.DeepRebirthError("--data (accuracy risk) goes with the Caffe plan; leave out --runtime")
        _runtime_plan(prototxt, weights, runtime, rules=rules, batch=batch or 1, threads=threads, rounds=rounds,
                      seed=seed, clock=clock, json_path=json_path)
        return
    plan = api.plan_file(prototxt, weights, rules=rules, batch=batch, threads=threads, rounds=rounds, seed=seed,
                         clock=clock, reference=runtime or reference)
    risks: dict[int, Any] = {}
    chosen = None
    if data is not None:
        assert weights is not None
        transform = api.pop_transform(settings, mirror=True)
        if budget is not None or max_drop is not None:  # the runs share the planned fine-tuning budget
            chosen = api.measure_risks(plan, prototxt, weights, data, max_drop, budget=budget or api.FINETUNE_BUDGET,
                                       transform=transform, seed=seed, progress=risk_progress)
            risks, risk_budget = chosen.risks, chosen.share
        else:
            options = api.risk_options(risk_budget, seed=seed, transform=transform)
            risks = {r.candidate: r for r in api.assess(prototxt, weights, plan.candidates, data, options,
                                                        progress=risk_progress)}
    click.echo(render.plan_text(prototxt, plan, risks, risk_budget))
    if chosen is not None and chosen.max_drop is not None:
        click.echo(render.accuracy_text(chosen))
    if json_path:
        api.save_plan(json_path, plan, risks, chosen)
        click.echo(f"wrote {json_path}")
