"""HF -> project conversion speed on SmolLM2-135M (538 MB of fp32 safetensors), in one run:

    python benchmarks/convert_speed.py [--hf-dir DIR]   # DIR: a HF Llama dir; default: SmolLM2 from GGUF

Prints, for the same checkpoint:
  read only      stream every tensor out of the safetensors shards (the floor any converter pays)
  import         `convert hf-to-mcore` as the CLI runs it: build the model, map every tensor, save
                 the megatron-core distributed checkpoint (megatron-core import time excluded)
  export         `convert mcore-to-hf`: load, un-fuse, write safetensors
as seconds and MB/s of safetensors bytes, and import / read-only.
"""
import argparse
import tempfile
import time
import warnings
from pathlib import Path


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-dir", help="existing HF directory (default: write SmolLM2 from the GGUF wheel)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = Path(args.hf_dir) if args.hf_dir else None
        if hf is None:
            from megatron_kd.interop.gguf_to_hf import write_smollm2_hf

            hf = write_smollm2_hf(tmp / "hf")
        import megatron.core  # noqa: F401  (import cost is not conversion cost)

        from megatron_kd.interop.convert import export_hf, import_hf
        from megatron_kd.interop.hf_files import ShardReader

        reader = ShardReader(hf)
        t0 = time.perf_counter()
        for name in reader.names():
            reader.get(name)
        read_s = time.perf_counter() - t0
        mb = reader.bytes_read / 1e6

        t0 = time.perf_counter()
        s = import_hf(hf, tmp / "run", progress=False)
        import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        e = export_hf(tmp / "run", tmp / "back", progress=False)
        export_s = time.perf_counter() - t0

    print(f"checkpoint: {s['architecture']} {s['parameters'] / 1e6:.1f}M parameters, {mb:.0f} MB safetensors")
    print(f"{'stage':<12}{'seconds':>10}{'MB/s':>10}")
    for stage, sec, size in (("read only", read_s, mb), ("import", import_s, mb),
                             ("export", export_s, e["bytes_written"] / 1e6)):
        print(f"{stage:<12}{sec:>10.2f}{size / sec:>10.1f}")
    print(f"import / read-only time: {import_s / read_s:.1f}x")


if __name__ == "__main__":
    main()
