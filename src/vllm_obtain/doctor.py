"""What this machine has, and which engine would serve which model and why: `vllm-obtain
doctor` prints it, the dashboard shows it (GET /admin/system)."""

from __future__ import annotations

from typing import Any

from vllm_obtain.contract import EngineNotInstalledError
from vllm_obtain.engines.registry import ENGINE_NAMES
from vllm_obtain.hardware import (
    RAY_INSTALL_HINT,
    choose_engine,
    detect_platform,
    llama_cpp_gpu_warning,
    ray_serve_version,
)
from vllm_obtain.settings import Settings, split_engine
from vllm_obtain.weights.catalog import aliases, model_format


def system_report(settings: Settings) -> dict[str, Any]:
    """The platform, the engines installed, and the engine each model would get."""
    info = detect_platform(probe_llama_build=True)
    choices: list[dict[str, str]] = []
    for spec in list(settings.model) or list(aliases()):
        name, requested = split_engine(spec, settings.engine)
        try:
            engine, why = choose_engine(info, model_format(name, settings.models_dir), requested)
            choices.append({"model": name, "engine": engine, "why": why})
        except (LookupError, EngineNotInstalledError) as exc:
            choices.append({"model": name, "engine": "", "why": f"cannot serve: {exc}"})
    return {
        "system": info.system,
        "machine": info.machine,
        "cpu_count": info.cpu_count,
        "memory_gib": info.memory_gib,
        "cpu_features": list(info.cpu_features),
        "apple_silicon": info.apple_silicon,
        "gpus": [f"{g.vendor} {g.name}" for g in info.gpus],
        "engines": {engine: engine in info.installed_engines for engine in ENGINE_NAMES},
        "llama_cpp_gpu_offload": info.llama_gpu_offload,
        "ray_serve": ray_serve_version(),
        "ray_install_hint": RAY_INSTALL_HINT,
        "warning": llama_cpp_gpu_warning(info),
        "choices": choices,
    }


def print_report(report: dict[str, Any]) -> None:
    memory = f"{report['memory_gib']:.1f} GiB" if report["memory_gib"] else "unknown"
    print(
        f"system      {report['system']} {report['machine']}, {report['cpu_count']} CPUs, "
        f"{memory} memory"
    )
    print(f"cpu         {' '.join(report['cpu_features']) or '-'}")
    print(f"apple       {'Apple Silicon' if report['apple_silicon'] else 'no'}")
    gpus = ", ".join(report["gpus"])
    print(f"gpus        {gpus or 'none (no nvidia-smi / ROCm device)'}")
    for engine, installed in report["engines"].items():
        print(f"engine      {engine:10} {'installed' if installed else '-'}")
    offload: dict[bool | None, str] = {
        True: "yes (its build has a GPU backend)",
        False: "no (a CPU-only build)",
        None: "not installed",
    }
    print(f"gpu offload {'llama.cpp':10} {offload[report['llama_cpp_gpu_offload']]}")
    ray = report["ray_serve"] or f"- ({report['ray_install_hint']})"
    print(f"cluster     {'ray serve':10} {ray}")
    if report["warning"]:
        print(report["warning"])
    print()
    for choice in report["choices"]:
        if choice["engine"]:
            print(f"{choice['model']:28} -> {choice['engine']:10} {choice['why']}")
        else:
            print(f"{choice['model']:28} -> {choice['why']}")
