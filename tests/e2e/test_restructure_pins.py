"""Behaviour pins: the plan hash and every output shard's sha256 of a few recipes (linear, TIES, a slices
frankenmerge, PlaM, PivotMerge) on deterministic tiny models are fixed values.

The values below were computed with the engine as it was before it was split into subpackages (engine/ as a
flat package, then shardmerge.engine.{recipe,io,layout,plan,run}), by running this module's `compute_pins` with
that layout's imports. Equal values mean the restructure changed neither the plan nor a single output byte.

A plan hash covers the inputs' file paths and modification times. To pin it, the inputs get fixed modification
times (`os.utime`) and the plan is built from inside the models' directory with paths relative to it (recipe model
references are relative; `Path.resolve` maps paths below that directory to relative ones while planning), so the
hash no longer depends on where the test runs. The merge itself runs unpatched. The inputs' own digests are pinned
too, so a change of a tiny-model builder shows as such and not as an engine change.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import yaml

MTIME_NS = 1_700_000_000 * 10**9  # fixed modification time of every input file
SHARD_SIZE = "30KB"  # several output shards per merge


def _api():
    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import parse_recipe
    from shardmerge.engine.tiny_models import build_base_llm, build_llm, build_mllm, derive_projector_expert
    from shardmerge.jobs.merge import run_merge

    return dict(
        build_llm=build_llm,
        build_mllm=build_mllm,
        build_base_llm=build_base_llm,
        derive_projector_expert=derive_projector_expert,
        parse_recipe=parse_recipe,
        build_plan=build_plan,
        run_merge=run_merge,
    )


def _models(api: dict, root: Path) -> None:
    """The inputs, built from fixed seeds; directory names are what the recipes refer to."""
    base = api["build_llm"](root / "base", seed=0)
    for k in (1, 2):
        api["build_llm"](root / f"e{k}", base=base, perturb_seed=k)
    base4 = api["build_llm"](root / "base4", seed=3, num_hidden_layers=4)
    for k in (1, 2):
        api["build_llm"](root / f"f{k}", base=base4, perturb_seed=20 + k)
    mllm = api["build_mllm"](root / "mllm", "qwen2_5_vl", seed=0, num_layers=3)
    api["build_base_llm"](root / "base_llm", "qwen2_5_vl", seed=1, from_mllm=mllm)
    init = api["build_mllm"](root / "init", "llava", seed=0, num_layers=2)
    for i, c in enumerate("abc"):
        api["derive_projector_expert"](init, root / f"expert_{c}", seed=i)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            os.utime(p, ns=(MTIME_NS, MTIME_NS))


RECIPES = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": "base", "parameters": {"weight": 0.5}},
            {"model": "e1", "parameters": {"weight": 0.3}},
            {"model": "e2", "parameters": {"weight": 0.2}},
        ],
        "dtype": "float32",
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "e1", "parameters": {"density": 0.5, "weight": 1.0}},
            {"model": "e2", "parameters": {"density": 0.7, "weight": [0.2, 0.8]}},
        ],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    },
    "slices": {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": "f1", "layer_range": [0, 3]}]},
            {"sources": [{"model": "f2", "layer_range": [1, 4]}]},
        ],
    },
    "plam": {
        "merge_method": "plam",
        "mllm": "mllm",
        "base_llm": "base_llm",
        "parameters": {"layers": [1, 2], "alpha": 0.4, "targets": "qkvo"},
    },
    "pivot": {
        "merge_method": "pivot",
        "models": [{"model": f"expert_{c}"} for c in "abc"],
        "dtype": "float32",
        "parameters": {
            "pivot": "mean",
            "energy": 0.9,
            "density": 0.2,
            "temperature": 1.0,
            "scale": 1.0,
            "contribution": "data_free",
        },
    },
}
INPUTS = {"linear": ("base", "e1", "e2"), "ties": ("base", "e1", "e2"), "slices": ("f1", "f2")}
INPUTS |= {"plam": ("mllm", "base_llm"), "pivot": ("expert_a", "expert_b", "expert_c")}


def _digest(files) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _neutral_plan_hash(api: dict, root: Path, data: dict, name: str) -> str:
    """The engine's plan hash with the inputs at paths relative to `root` (see the module docstring)."""
    real_resolve = Path.resolve
    real_root = real_resolve(root)

    def resolve(self, strict=False):
        p = real_resolve(self, strict)
        return Path(os.path.relpath(p, real_root)) if p.is_relative_to(real_root) else p

    cwd = os.getcwd()
    os.chdir(root)
    Path.resolve = resolve
    try:
        recipe = api["parse_recipe"](data, source=name)
        return api["build_plan"](recipe, shard_size=SHARD_SIZE, source=name).plan_hash
    finally:
        Path.resolve = real_resolve
        os.chdir(cwd)


def compute_pins(api: dict, root: Path) -> dict[str, dict]:
    """name -> {inputs: digest of the input files, plan_hash, shards: {file name: sha256}}."""
    root.mkdir(parents=True, exist_ok=True)
    _models(api, root)
    pins = {}
    for name, data in RECIPES.items():
        inputs = _digest(f for m in INPUTS[name] for f in sorted((root / m).iterdir()) if f.is_file())
        plan_hash = _neutral_plan_hash(api, root, data, name)
        recipe = root / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(data))
        out = root / f"out_{name}"
        api["run_merge"](recipe, out, workers=0, shard_size=SHARD_SIZE, progress=False)
        shards = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.glob("*.safetensors"))}
        pins[name] = {"inputs": inputs, "plan_hash": plan_hash, "shards": shards}
    return pins


# computed by compute_pins with the engine before the split into subpackages (see the module docstring)
PINS: dict[str, dict] = {
    "linear": {
        "inputs": "4a70485d792d6b051adc59f09040c310d97c0c93d815dfdc19676d4683d12921",
        "plan_hash": "ea1bd0700f4a260be1afc29f0e0de353db8e387515c9b301de39440fd7d5823c",
        "shards": {
            "model-00001-of-00005.safetensors": "1c0765d79abfa2d508cb8ee398861f1262f3985a63671a9041a003fc2f66db47",
            "model-00002-of-00005.safetensors": "3f5223316d89677f29848037ecdab17098aacdc674590c1214b32b12081b2548",
            "model-00003-of-00005.safetensors": "8a981076dda985d4e92399681dc1500249fcca5302276bf67e3edc98480ce740",
            "model-00004-of-00005.safetensors": "e27bc8f87c20653eaf9fce93e8c26cf02e8f6c27690b5341d4be994e60ff1fd9",
            "model-00005-of-00005.safetensors": "579ab1d6c637a0a8397a869632823d03c75ae937e6d6d3202ed897fc8a4437a0",
        },
    },
    "ties": {
        "inputs": "4a70485d792d6b051adc59f09040c310d97c0c93d815dfdc19676d4683d12921",
        "plan_hash": "dacc393325ae1fbf42ba0be20eadaa8f738b60c6432491bed1343fd8e99d06e8",
        "shards": {
            "model-00001-of-00002.safetensors": "f4d6ffe501ff0aff7543b0be45bf67ab3be4c5f48496d366403302ea85b39816",
            "model-00002-of-00002.safetensors": "663d6d85f2cfc0de12928f89267e887ff3b1e3d2df6d4846b95935631ea584a8",
        },
    },
    "slices": {
        "inputs": "4886902d2accd814097d818fbf0ca273d4eefe1ecd7b9aa82c077189eb48c815",
        "plan_hash": "776207ff7a6532c1d19b4349a18d78b2b08593fdbdddffaeae27755d09a79bbe",
        "shards": {
            "model-00001-of-00013.safetensors": "fdb886f80917b9020730be29d8194f06faa1bddf24abc0c9e541c2275f4cf58b",
            "model-00002-of-00013.safetensors": "72ed68d7ff4208e53ed8f21693ab50eba186767527457ef4bd87de3f9b8fdfb9",
            "model-00003-of-00013.safetensors": "dadb415f08679e7266aea24d322eeb0ac3e7a254af494e96f8b6b4d7c55c8510",
            "model-00004-of-00013.safetensors": "6fe7bf9a352af756c1d1559c7f2b423c36680bbd96c15611f00d303aec9cfba3",
            "model-00005-of-00013.safetensors": "c219d843204b09744134901b90498290b546d28f265aef0a9acfffda5a85a8ff",
            "model-00006-of-00013.safetensors": "0841392ac8d3a816b535e6f561e72286699b4ce87727fd95bdc8a1f59f9e9361",
            "model-00007-of-00013.safetensors": "70a54170c20bdd69a10e6f829e2dfe3b64b2f4cf53f28ac2a24f549d3a4e9836",
            "model-00008-of-00013.safetensors": "580c5628a29ddb5965a09ddb60e7fe59acde461a48b337e4aff9a79c103b6c58",
            "model-00009-of-00013.safetensors": "15b47e9f25612f90dd476d058b7e026fc3852813dcb5f2b3d3d5227064d4ed9c",
            "model-00010-of-00013.safetensors": "69ef82187451a4d4857fdb1333a92bab2a16e441cda89c8008eff23a27fd010c",
            "model-00011-of-00013.safetensors": "84116750ad5102fafc8cb1c28e4fc3a672679149aa58b8bb4ca44075ff87826a",
            "model-00012-of-00013.safetensors": "04d10885502daaf311eb2e7b3307adfff88374d853f42a7855218a6c1365ac25",
            "model-00013-of-00013.safetensors": "5eb44ce990b54d0f8f1e2f865169d64a8c315d466c2957ad09269e4db30eb5ab",
        },
    },
    "plam": {
        "inputs": "8766a432d033c15ae1a9e017c51e7e10f835c1002cab6eab7eb9f85575934ebf",
        "plan_hash": "0ecfb32de6879b1ee288c79675a7089fde936f977fab05834a7742e5dfd7e75e",
        "shards": {
            "model-00001-of-00029.safetensors": "718d366d41656222fdad0e9061dee457b6fbaa4ab99ec623e31336c104978ace",
            "model-00002-of-00029.safetensors": "1ef8828b3b00d3de304ed385d3e71a3bb39a25ec56768d019c20159443dd7575",
            "model-00003-of-00029.safetensors": "8e038c868beb3b34eeafe55c8cb16356f94f7d056ffc7ae1b5aa40d98b072d97",
            "model-00004-of-00029.safetensors": "2ba1b679ed0fa9ae656cd33cddce74f67494d4d52f2fd0345f485281e27db8be",
            "model-00005-of-00029.safetensors": "9aeeb428248a31477fa44353f9518c6d0c9f3bdd77f82d6ede81c324cc4c80b6",
            "model-00006-of-00029.safetensors": "78c7a7c079b4da9a81622b81f93c99a86fbcbde7058b8d612a6f26e9f70c42a1",
            "model-00007-of-00029.safetensors": "8e6a3ae9af91e6eb2fc9f709ec21aabc10575540d052d662f231199a647f71fb",
            "model-00008-of-00029.safetensors": "674af336ab69334bfd45a8a5d6aea29bad547c12c86579170b159a5a3772c249",
            "model-00009-of-00029.safetensors": "563c20369e935891a22b49f2aec680f54ad2298e4e966e79618b79503947041a",
            "model-00010-of-00029.safetensors": "694d9a4779fa7467da9dfefc111e83196da0835df6050b486bff4ff97a342ea2",
            "model-00011-of-00029.safetensors": "39ef23c7f58ac0e7b562cb4e31f67ae357c000e290576e3b45f29b1b762e247f",
            "model-00012-of-00029.safetensors": "67d005d8680cba1eab1e0d2d554d2be7faa7bd75a4313da161c28033570b4d43",
            "model-00013-of-00029.safetensors": "3bb2852ec83b87c9eb5943089ccb936185c8408b3252ba760d1eb824486f7bd8",
            "model-00014-of-00029.safetensors": "6c09e5584a203455f3ab61ab0a90481eea8ca8594677d42801efbff28392ad6c",
            "model-00015-of-00029.safetensors": "244336918570b874f431d6b4a3ebf109780e83f43d145913bdaca2d7b7d276e2",
            "model-00016-of-00029.safetensors": "75dd1d7b462b7b00ecdb0edd983ebcaeddf120c5efda2adf6a62c678529d7c02",
            "model-00017-of-00029.safetensors": "acc788685e67984abd7daf36825f550a92ebc197ffab511bda1e29456fe2ed54",
            "model-00018-of-00029.safetensors": "e5ba2224e63e4d0cb0ac991c0f944547f918ba251ff0d05992ea68b4540b5d57",
            "model-00019-of-00029.safetensors": "87d851c9a5e9680adcc54ecf73ade484b79ff5a281106f3c11f1a1d706872ecb",
            "model-00020-of-00029.safetensors": "1a2f7c5c37fef92b3a0cd4c3864781acb2e73f0a5bc6345aeeb571057ec421d8",
            "model-00021-of-00029.safetensors": "42e0ebf00d8e712f2e1b64aa2586c7b5bcbd2a1833861c87147abef0773c74f4",
            "model-00022-of-00029.safetensors": "a5370257c21e8b9ae92ddebf45ac202261c4bbe261ed8c538bb84814feadb49c",
            "model-00023-of-00029.safetensors": "ed6b247112d8943461e2ce8acfdd2e7d324596d11322c2a12388b33de33e88ba",
            "model-00024-of-00029.safetensors": "bc6643a7b135ec557416517f102195bf479b828a138bc2fc0b86de58f004651f",
            "model-00025-of-00029.safetensors": "86d25e0e1a1588271147eed2e229a120b8d3dccdf171113092376d9e7f075276",
            "model-00026-of-00029.safetensors": "d144d9168c835698d04c2d1ab82a6ea426435e6dcc5e8981393505554c7845fb",
            "model-00027-of-00029.safetensors": "8d357c25b5761f483bcce0e3ca50f3052474807c103c5774d1a80ad500a423d2",
            "model-00028-of-00029.safetensors": "c08723737aed41c44fd839b93f0d77472ca1fa8d32816316c3d92e9d9aaa07c3",
            "model-00029-of-00029.safetensors": "8b350051d0900635f6ecf8642201017123d590db19699e5080455ff440575d64",
        },
    },
    "pivot": {
        "inputs": "177458beeec5e5a11074518f9168b00addd17d5df375552142b106bae3975538",
        # re-pinned after the restructure, on purpose: `weight_inputs` became a declared (internal) parameter of
        # the pivot op, so every pivot op now carries it in its plan parameters; the shard bytes are unchanged
        "plan_hash": "4b154ab8c3860d644ed878dab11095dc9eb229c4fe45e75092c907b0f119a319",
        "shards": {
            "model-00001-of-00021.safetensors": "bdad5b62fa45c2faf47addf5ce3bfcc2ba20c0a65d1cbbfaa5db970fe4958812",
            "model-00002-of-00021.safetensors": "928b3662e4b2f01410e9ab79d9c1887ae1332b21c14f5b032eb9c9cb0c7bd104",
            "model-00003-of-00021.safetensors": "12e97ed58e386e87943a913d38c1c91a6254175726988d662a799890e18122fe",
            "model-00004-of-00021.safetensors": "387a9db19603d09c8768842c43822d307318faf2d09d2557d22830d7efc004ef",
            "model-00005-of-00021.safetensors": "049c4830eecc51eb552c73370e2dbaa95c16362884a7093157b755bc8941c636",
            "model-00006-of-00021.safetensors": "84169c07d311899518d842c3ed1e987f8261cd9993290bd29707e118e47a39f4",
            "model-00007-of-00021.safetensors": "d08b1754d175eb7bfee494bca84e3943c100b735ffa7b4730a6cf825344cb462",
            "model-00008-of-00021.safetensors": "3d0f74ac4869347a65c0d9f8d49b52363b0c8c7d34c41111e44f68b159aca0e4",
            "model-00009-of-00021.safetensors": "40e70ad0997943b77bb0678ae92d3b67d703c97b41d3019c226f2e718f8d8f09",
            "model-00010-of-00021.safetensors": "e438ffa43840b254cc81c2660023f5cad6c277ad5c4886e960077218f162e1c2",
            "model-00011-of-00021.safetensors": "eae580dc205ac0c58f720ebf5131a82b40a9ae966f98e04154b8d92218c4dfe9",
            "model-00012-of-00021.safetensors": "20b12faaeca7b65f1cd2a9d12b93228d0a48f261fefaa8ae4a3bcd0d0bf1d221",
            "model-00013-of-00021.safetensors": "0b52ccbce9445d4287b9e61035c34684e13ad5c1922acf79a425112f460dbece",
            "model-00014-of-00021.safetensors": "a48f8380cdca2ba45d60711d5de31dabbe588b37838f01b17c4c4603efe93b8b",
            "model-00015-of-00021.safetensors": "d2f58f2b3e358a203f05fea8dc89c6d79551dd9ff0747a85b55b995502b167f0",
            "model-00016-of-00021.safetensors": "038ab565591f3c1e17246ba79b0b469eeb52a68605d84c06d99a7d9d15473458",
            "model-00017-of-00021.safetensors": "3b9a54ef1aa0232c3383c6508165ff9b13b2024628722abc52885d961a3b0b90",
            "model-00018-of-00021.safetensors": "e6afecb13b493a727b96f3f7fd96ce70298399a9f25435ae05474f6eedf41b73",
            "model-00019-of-00021.safetensors": "46359d3e3431f42fd9fb58672efc0d1cc8c0da1c75ae136eb0ab2adfe4186557",
            "model-00020-of-00021.safetensors": "7fbd2f04302e6e514d7226dafcadcb3dfbc27dee67522680261191db07b78730",
            "model-00021-of-00021.safetensors": "d7a36d05a3466a60aa0f55e82532f249c2bca4a20733262b2bdd67717696f88c",
        },
    },
}


def test_plan_hashes_and_output_bytes_are_pinned(tmp_path):
    got = compute_pins(_api(), tmp_path / "pins")
    assert set(got) == set(PINS)
    for name, want in PINS.items():
        assert got[name]["inputs"] == want["inputs"], f"{name}: the tiny-model builders changed the inputs"
        assert got[name]["plan_hash"] == want["plan_hash"], f"{name}: plan hash changed"
        assert got[name]["shards"] == want["shards"], f"{name}: output shards changed"
