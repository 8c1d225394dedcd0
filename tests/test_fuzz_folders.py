"""Mutation tests over artifact manifests and checkpoint folders (issue 11).

Each mutation is applied to a private copy of a valid folder (the tiny preset) and loaded. The only
outcomes allowed: the folder loads, or one `UnclipError` line. A folder that loads must mean the
same to the runtime as the original (an artifact: the same sizes, schedules, networks, tensors,
files and hashes; a checkpoint: it generates images). Through the CLI, the same cases give exit 0
or exactly one line `unclip: error: ...` and never a traceback.

Mutations (counts are asserted below and reported in each test's output):
  * every key of manifest.json, at every depth (list items' keys too) x {delete, retype, swap};
  * every file of the artifact x {delete, truncate to half, truncate and re-hash in the manifest
    (so that the file's own reader, not the hash check, meets the damage)};
  * every key of model_index.json, of sampler_defaults.json, of a scheduler_config.json and of
    tokenizer_config.json x {delete, retype, swap};
  * every file of the checkpoint x {delete, truncate to half}.
retype: an object becomes a text, a list an object, a text a number, a number or true/false a
text, null a list. swap: the value changes places with the next key's in the same object (a key
alone in its object: with the next key in document order outside its own subtree).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from tests.cli_helpers import run_cli
from tests.onnx_artifacts import exported, without_pair
from unclip.errors import UnclipError

HOW = ("delete", "retype", "swap")
STEPS = ["--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2"]


# -- mutating a JSON document ---------------------------------------------------------------------------


def key_paths(node, prefix: tuple = ()) -> list[tuple]:
    """Every object key, depth first, as a path of keys and list indexes."""
    paths = []
    if isinstance(node, dict):
        for key, value in node.items():
            paths.append((*prefix, key))
            paths += key_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            paths += key_paths(value, (*prefix, i))
    return paths


def _at(doc, path: tuple):
    for part in path:
        doc = doc[part]
    return doc


def retyped(value):
    if isinstance(value, dict):
        return "oops"
    if isinstance(value, list):
        return {"oops": 1}
    if isinstance(value, str):
        return 7
    if value is None:
        return []
    return str(value)  # numbers and true/false


def mutated(doc: dict, path: tuple, how: str) -> dict:
    doc = copy.deepcopy(doc)
    parent, key = _at(doc, path[:-1]), path[-1]
    if how == "delete":
        del parent[key]
    elif how == "retype":
        parent[key] = retyped(parent[key])
    else:
        keys = list(parent)
        if len(keys) > 1:
            other_parent, other = parent, keys[(keys.index(key) + 1) % len(keys)]
        else:
            paths = key_paths(doc)
            later = [p for p in paths[paths.index(path) + 1:] + paths
                     if p[:len(path)] != path and path[:len(p)] != p]
            other_parent, other = _at(doc, later[0][:-1]), later[0][-1]
        parent[key], other_parent[other] = other_parent[other], parent[key]
    return doc


def one_line(exc: UnclipError) -> None:
    assert str(exc) and "\n" not in str(exc), str(exc)


def cli_one_line_or_success(result) -> str:
    """'ok' or 'refused'; anything else (a traceback, several lines) fails the test."""
    assert "Traceback" not in result.output, result.output[-3000:]
    if result.exit_code == 0:
        return "ok"
    errors = [line for line in result.stderr.splitlines()
              if line.strip() and not line.startswith("unclip: info: ")]
    assert result.exit_code == 1 and len(errors) == 1 and errors[0].startswith("unclip: error: "), \
        (result.exit_code, result.output[-3000:])
    return "refused"


# -- artifacts ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    # as exported without --step-cache: the pair's entries have every network's schema, and their 126
    # keys would add a third to the cases (the pair's own refusals: tests/test_step_cache_onnx.py)
    return without_pair(exported(tmp_path_factory, "tiny"), tmp_path_factory.mktemp("fuzz") / "artifact")


def runtime_view(loaded) -> tuple:
    """What a runtime takes from an artifact: a mutation that loads must leave all of it alone."""
    m = loaded.manifest
    networks = {name: {k: e[k] for k in ("file", "sha256", "external_data", "inputs", "outputs", "precision")}
                for name, e in m["networks"].items()}
    constants = {k: v.tolist() for k, v in loaded.constants.items()}
    files = sorted(m["files"].items())
    return (loaded.dims, loaded.schedulers, m["precision"], m["configs"], networks, files,
            loaded.tokenizer.model_max_length, constants, loaded.sampler_defaults)


@pytest.mark.slow
def test_manifest_mutations(artifact, tmp_path):
    """Every case through load_artifact; then through `unclip generate --backend onnxruntime` every
    refused case (one line, no traceback) and one in 40 of the accepted ones (they generate)."""
    from unclip.engine.artifact import load_artifact

    folder = tmp_path / "artifact"
    shutil.copytree(artifact, folder)
    original = json.loads((folder / "manifest.json").read_text())
    baseline = runtime_view(load_artifact(folder))
    accepted, refused = [], []
    for path in key_paths(original):
        for how in HOW:
            (folder / "manifest.json").write_text(json.dumps(mutated(original, path, how)))
            try:
                loaded = load_artifact(folder)
            except UnclipError as exc:
                one_line(exc)
                refused.append((path, how))
                continue
            assert runtime_view(loaded) == baseline, (path, how)
            accepted.append((path, how))
    cli = {"ok": 0, "refused": 0}
    for (path, how), expected in [*((case, "refused") for case in refused),
                                  *((case, "ok") for case in accepted[::40])]:
        (folder / "manifest.json").write_text(json.dumps(mutated(original, path, how)))
        result = run_cli("generate", "a", "--model", str(folder), "--backend", "onnxruntime",
                         "--out", str(tmp_path / "out"), *STEPS)
        assert cli_one_line_or_success(result) == expected, (path, how)
        cli[expected] += 1
    keys = len(key_paths(original))
    print(f"manifest mutations: {keys} keys x {len(HOW)} = {len(accepted) + len(refused)} cases, "
          f"{len(accepted)} loaded (same runtime view), {len(refused)} refused; through the CLI: {cli}")
    assert len(accepted) + len(refused) == len(HOW) * keys >= 900


def _rehash(folder: Path, manifest: dict, relative: str) -> dict:
    from unclip.export.manifest import sha256_file

    manifest = copy.deepcopy(manifest)
    digest = sha256_file(folder / relative)
    manifest["files"][relative] = digest
    for entry in manifest["networks"].values():
        if entry["file"] == relative:
            entry["sha256"] = digest
    return manifest


@pytest.mark.slow
def test_artifact_file_mutations(artifact, tmp_path):
    """Through the CLI: each file deleted, truncated, truncated and re-hashed."""
    files = sorted(p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file())
    outcomes = {"ok": 0, "refused": 0}
    cases = 0
    for relative in files:
        for how in ("delete", "truncate", "truncate+rehash"):
            if relative == "manifest.json" and how == "truncate+rehash":
                continue
            folder = tmp_path / f"case{cases}"
            shutil.copytree(artifact, folder)
            target = folder / relative
            if how == "delete":
                target.unlink()
            else:
                data = target.read_bytes()
                target.write_bytes(data[:len(data) // 2])
                if how == "truncate+rehash":
                    manifest = json.loads((folder / "manifest.json").read_text())
                    (folder / "manifest.json").write_text(json.dumps(_rehash(folder, manifest, relative)))
            result = run_cli("generate", "a", "--model", str(folder), "--backend", "onnxruntime",
                             "--out", str(tmp_path / "out"), *STEPS)
            outcome = cli_one_line_or_success(result)
            assert outcome == "refused", (relative, how, result.output)  # every file is needed and hashed
            outcomes[outcome] += 1
            cases += 1
            shutil.rmtree(folder)
    print(f"artifact file mutations: {len(files)} files, {cases} cases: {outcomes}")
    assert cases == 3 * len(files) - 1


# -- checkpoint folders -------------------------------------------------------------------------------

CHECKPOINT_JSON = ("model_index.json", "sampler_defaults.json", "decoder_scheduler/scheduler_config.json",
                   "tokenizer/tokenizer_config.json")


@pytest.fixture(scope="module")
def checkpoint(tiny_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(tiny_folder, folder)
    (folder / "sampler_defaults.json").write_text('{"decoder_guidance": 1.5, "decoder_steps": 3}')
    return folder


def _generate_checkpoint(folder: Path, out: Path):
    return run_cli("generate", "a", "--model", str(folder), "--out", str(out), *STEPS)


@pytest.mark.slow
def test_checkpoint_json_mutations(checkpoint, tmp_path):
    """Every case through load_components: a checkpoint that loads generates images (2 steps per
    stage); then through `unclip generate` every refused case and one in 5 of the accepted ones."""
    import unclip
    from unclip.models.checkpoint import load_components

    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    accepted, refused, counts = [], [], {}
    for relative in CHECKPOINT_JSON:
        original = json.loads((folder / relative).read_text())
        paths = key_paths(original)
        counts[relative] = len(paths)
        for path in paths:
            for how in HOW:
                (folder / relative).write_text(json.dumps(mutated(original, path, how)))
                try:
                    components = load_components(folder)
                except UnclipError as exc:
                    one_line(exc)
                    refused.append((relative, original, path, how))
                    continue
                images = unclip.load(components).generate("a", output_type="np", prior_steps=2,
                                                          decoder_steps=2, super_res_steps=2)
                assert images.shape == (1, 32, 32, 3), (relative, path, how)
                accepted.append((relative, original, path, how))
        (folder / relative).write_text(json.dumps(original))
    cli = {"ok": 0, "refused": 0}
    for (relative, original, path, how), expected in [*((case, "refused") for case in refused),
                                                      *((case, "ok") for case in accepted[::5])]:
        (folder / relative).write_text(json.dumps(mutated(original, path, how)))
        result = _generate_checkpoint(folder, tmp_path / "out")
        assert cli_one_line_or_success(result) == expected, (relative, path, how)
        (folder / relative).write_text(json.dumps(original))
        cli[expected] += 1
    total = len(accepted) + len(refused)
    print(f"checkpoint JSON mutations: keys {counts} x {len(HOW)} = {total} cases, {len(accepted)} loaded "
          f"and generated, {len(refused)} refused; through the CLI: {cli}")
    assert total == len(HOW) * sum(counts.values())


@pytest.mark.slow
def test_checkpoint_file_mutations(checkpoint, tmp_path):
    files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    outcomes = {"ok": 0, "refused": 0}
    for relative in files:
        for how in ("delete", "truncate"):
            folder = tmp_path / "model"
            shutil.copytree(checkpoint, folder)
            target = folder / relative
            if how == "delete":
                target.unlink()
            else:
                target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])
            outcomes[cli_one_line_or_success(_generate_checkpoint(folder, tmp_path / "out"))] += 1
            shutil.rmtree(folder)
    print(f"checkpoint file mutations: {len(files)} files x 2 = {sum(outcomes.values())} cases: {outcomes}")
    assert sum(outcomes.values()) == 2 * len(files)
