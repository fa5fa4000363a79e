"""Golden values pinned before the one-way-house move (issue 20): the refactor must not change a number.

Both runs go through the CLI, the surface that every layout change must keep:

* the sha256 of every data file (shard files under ``c/``) of a debug-size encode of demo scenes with the shipped
  demo teacher (CPU, float32, one thread, fixed seed, 2 draws x 2 flips);
* the first 5 losses (total, MSE, attention transfer) of a debug distill run on that bank.

A change to these values is allowed only with its reason in the commit that changes them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dreamteacher.cli import main

REPO = Path(__file__).resolve().parents[1]

# sha256 of <bank>/<relative path> for every file below a "c/" folder (the arrays' chunk and shard files)
BANK_FILES: dict[str, str] = {
    "draw/c/0": "9fc676173e9cce4978853fb34ad8491e5e3bcfae952193b716a843f283a3ed9e",
    "draw/c/1": "9fc676173e9cce4978853fb34ad8491e5e3bcfae952193b716a843f283a3ed9e",
    "draw/c/2": "9fc676173e9cce4978853fb34ad8491e5e3bcfae952193b716a843f283a3ed9e",
    "features/s16/offset/c/0/0": "5f7cb3607f7e449fc5f90f71df8a80654a84484b241ab8cff84c564f67a6193a",
    "features/s16/offset/c/1/0": "6acc1561da423b25c76879219532e19389edaeff0f3875b2a552232651db9825",
    "features/s16/offset/c/2/0": "81af6267d2d73024c54396ff088026c449230c78751ebd58404b8268e4cf4637",
    "features/s16/q/c/0/0/0/0": "d7940c1dac516caf3b02e9f543caf63f8159b3b02174826d35015abf804a78f7",
    "features/s16/q/c/1/0/0/0": "3d916b204a05875f364c9fc69f540f84625f416153376e5280472126a20636ab",
    "features/s16/q/c/2/0/0/0": "b4a4175be817dc665984ec9354d8973671b9c53624985da7e602271864b08607",
    "features/s16/scale/c/0/0": "2f139208008d9b5cd4a3ff7f979c63bec7a4276c3f583a475c63eee398838479",
    "features/s16/scale/c/1/0": "fe526863f42d7555add38cb5aaa0cf9c500ea4b0d252f1f41bfbf0aef5888f5b",
    "features/s16/scale/c/2/0": "635c1a59512cdc11386a9ef98ac325851b6c3ad3cd1a52363b640e34849470d7",
    "features/s32/offset/c/0/0": "39617687545cdd8f54084baeaa8258d2d1cffecb6a9fd460dd7dccf5d0f7f288",
    "features/s32/offset/c/1/0": "96d786d58687df0e8178e5c624c0a7ebad7406295ba78e37b3d512e0d8327ca5",
    "features/s32/offset/c/2/0": "bc80f5ada54c4c9e693fd66c6f56e6fb7ae94cfd78e8d436cd6fbf572af3f4ba",
    "features/s32/q/c/0/0/0/0": "2e5cdb9ed85410e505053ea35e4ce09c9e1fbc4cf474f42d062f2df63abb335d",
    "features/s32/q/c/1/0/0/0": "97e76b5a0a9956edbaa224856d0281f3f781cf543754969467b2abeff411d4c4",
    "features/s32/q/c/2/0/0/0": "cac6d20c9deebbde604cba39889879c6352390011a6fa0ffe92e5bc6f157ee53",
    "features/s32/scale/c/0/0": "7df6478157d9e221d3321388b04a318d15f3a29dad23506f8aad72612e058e43",
    "features/s32/scale/c/1/0": "b6b5270950504b518618f946aa754a6938bd811f94ad6412554992e39d4c036c",
    "features/s32/scale/c/2/0": "1d5557ae5f53ca35f57ea5d4f74105541d94d9a5f396ebc55f0a82b8543df24f",
    "features/s4/offset/c/0/0": "873e2061c18fe664fec998a29c9adee4f66ad900c52ce871315a26c00f8d3c5b",
    "features/s4/offset/c/1/0": "6a19d28012a35256b554e27e5726122a6d788cec2843fd1adc84ca85a15748d4",
    "features/s4/offset/c/2/0": "bdf90395fed01a65dc39d14d356a584a353b98d4fa3bb856dbb7dcdd6ecf78af",
    "features/s4/q/c/0/0/0/0": "c3437821022bbeb0f0e6d833f10fddf936d29f2d61d4d1b089311ce791eb67d0",
    "features/s4/q/c/1/0/0/0": "53af9d2b5ac43d1d3a351ecd606514dcc3ccd05b0ae24b8a5fc401ecd596594d",
    "features/s4/q/c/2/0/0/0": "4f9424b2f8671b76bedef7615051c26d2bd003264982f9f2e913fbab68236a1a",
    "features/s4/scale/c/0/0": "5e1dad116a19516bae88554a66ada2b51f5f15eadf83233c4dd4e2b99ab225fa",
    "features/s4/scale/c/1/0": "101b6fc140f46ecf505c6dce61fed8bfc8e04dd45bb724b52a68d316658fda61",
    "features/s4/scale/c/2/0": "692f7544611565feb8ffad9e6ff777da70af61f26b46c66958d6491b3b6efd20",
    "features/s8/offset/c/0/0": "aa672e84fd08673a3cb36007ffe36dbb92d4841521f691b0225d0605428332a0",
    "features/s8/offset/c/1/0": "28d7b51faf00f8b1eea0547ab41a9f83c098e8b937f272eefbb62353f075d64e",
    "features/s8/offset/c/2/0": "7b511a6a9615f2c48ba12692fbbcd19d7ab03286b259abac1164b6a847d89677",
    "features/s8/q/c/0/0/0/0": "dafc5a72a9a0054f9d50e8dc019a2fa3626ff9b800f0ccc2b329d988112b201b",
    "features/s8/q/c/1/0/0/0": "9c67f11ddde621a624dd576d286844188d230db0f44fc8f5935409ae0f8af88a",
    "features/s8/q/c/2/0/0/0": "7bb6df28e70f576fd814ddbaa9613f6d150f96da56cdcde69f0a357f3b9a4549",
    "features/s8/scale/c/0/0": "85602b352d19032ebd1ef486317fe539653dd94eff08a69fcb0d74cd62959a4c",
    "features/s8/scale/c/1/0": "47b576ad5952d84aaf69260cd6c33f66b60932665ce0b0641e188bec828ec177",
    "features/s8/scale/c/2/0": "f32fcba53b739aa42367d9679598f437bf7557d6de6437f94cd491918ddde728",
    "flip/c/0": "3382115ec300a398f776a5ceab6ac1807cb1dd02ca78e579a71c189e6c5bf7ed",
    "flip/c/1": "3382115ec300a398f776a5ceab6ac1807cb1dd02ca78e579a71c189e6c5bf7ed",
    "flip/c/2": "3382115ec300a398f776a5ceab6ac1807cb1dd02ca78e579a71c189e6c5bf7ed",
    "image/c/0/0/0/0": "94346d02d90bbc30fc1d75fd6e6c132455df01fd74c1f7ee22dcc83ea0a62975",
    "image/c/1/0/0/0": "040070ba75e12af4833957bb6e99931e12d1f95f4cebf7619e784aed2560953d",
    "image/c/2/0/0/0": "f14c01c00eb764241586e59f640b26c408bcf65b730a8f3f2eed789b5c4649ad",
    "key/c/0/0": "1fb26da55f8faa22de2e1ac0e29f93cc467a15e7e475318524ff5482fd839dbd",
    "key/c/1/0": "d63100dcedbdc6f6804ed412d993bd3e833b363f6270a52bd81f9ca50dfa601b",
    "key/c/2/0": "62b6cbfcc1618526571e4c1cadd0c88b32e223ef8d3383fb1d6700522a624077",
    "ok/c/0": "cc8cd41cef907c4d216069122c4b89936211361f9050a717a1e37ad1862e952f",
    "ok/c/1": "cc8cd41cef907c4d216069122c4b89936211361f9050a717a1e37ad1862e952f",
    "ok/c/2": "cc8cd41cef907c4d216069122c4b89936211361f9050a717a1e37ad1862e952f",
    "seed/c/0": "e36174e00cb0a4ff6a28447ea7862b7b45975395a972afda2f5e0875ff0f7095",
    "seed/c/1": "0601fff6178a606f1ffc902ca8b1a51186cbbcc5c74cb05c060e4a3265d8d664",
    "seed/c/2": "5a7b8e484fce5a2b7b1621ffb8b6b35bed795d4d8ebc43f7e079852016e02518",
    "source_index/c/0": "410510ff3440c2a3848ba21e24e2d9d4f85ee3d44c44ea9af076db55085cbf51",
    "source_index/c/1": "5606b32ae0a511a4d643f425bf026ec0e931047ce10999ca0c749aa6ea9c02ca",
    "source_index/c/2": "9866ae0b04b148cdf0ab06c818655d8f18e34175c0a06fe5f3c74cb203c55be3",
}
# (loss, mse, at) of distill steps 1..5
LOSSES: list[tuple[float, float, float]] = [
    (6.854501724243164, 1.1912081241607666, 0.5663293600082397),
    (7.384130477905273, 1.1998456716537476, 0.6184284687042236),
    (6.102537631988525, 1.1933375597000122, 0.4909200072288513),
    (5.872235298156738, 1.1794111728668213, 0.4692823886871338),
    (5.393001079559326, 1.1850069761276245, 0.4207994043827057),
]


def _scenes(folder: Path, count: int) -> None:
    from sources.demo_scenes import scene_for

    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(scene_for("unlabeled", i).image_HW3).save(folder / f"{i:05d}.png")


def _invoke(args: list[str]) -> None:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _data_files(bank: Path) -> dict[str, str]:
    return {
        str(p.relative_to(bank)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(bank.rglob("*"))
        if p.is_file() and "c" in p.relative_to(bank).parts[:-1]
    }


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], list[dict]]:
    tmp = tmp_path_factory.mktemp("goldens")
    _scenes(tmp / "scenes", 12)
    bank, runs = tmp / "bank.zarr", tmp / "runs"
    data = [f"datasets.golden={{root: {tmp / 'scenes'}, layout: folder, teacher: demo, t: 50}}"]
    torch.manual_seed(0)
    _invoke(
        ["encode", "--no-dask", "--quiet", "--config", str(REPO / "pipeline.yaml"), *data,
         f"teachers.demo.path={REPO / 'assets/demo-teacher'}", "teachers.demo.dtype=fp32",
         "encode.data=golden", f"encode.bank={bank}", "encode.draws=2", "encode.flips=both",
         "encode.batch_size=16", "encode.num_workers=0", "encode.cpu_threads=1", "bank.shard_rows=16"]
    )  # fmt: skip
    _invoke(
        ["distill", "--no-progress", "--config", str(REPO / "pipeline.yaml"), *data, "encode.data=golden",
         f"distill.bank={bank}", f"distill.out={runs}", "distill.exp=golden", "distill.student.name=resnet10t",
         "distill.regressor.channels=32", "distill.batch_size=8", "distill.num_workers=0", "distill.max_steps=5",
         "distill.log_every=1", "distill.optim.warmup_epochs=0", "distill.device=cpu"]
    )  # fmt: skip
    records = [json.loads(line) for line in (runs / "golden" / "metrics.jsonl").read_text().splitlines()]
    return _data_files(bank), records


def test_encode_data_files_are_unchanged(golden_run: tuple[dict[str, str], list[dict]]) -> None:
    files, _ = golden_run
    assert files == BANK_FILES


def test_first_distill_losses_are_unchanged(golden_run: tuple[dict[str, str], list[dict]]) -> None:
    _, records = golden_run
    assert [r["step"] for r in records[:5]] == [1, 2, 3, 4, 5]
    got = [value for r in records[:5] for value in (r["loss"], r["mse"], r["at"])]
    assert got == pytest.approx([value for step in LOSSES for value in step], rel=1e-6, abs=1e-9)
