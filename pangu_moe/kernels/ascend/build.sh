#!/usr/bin/env bash
# Build the pangu_moe Ascend C ops (kernels/ascend/<op>/{op_host,op_kernel}) into one custom-op vendor
# package, "pangu_moe", with the custom_compiler bundled in the MindSpore wheel
# (mindspore/lib/plugin/ascend/custom_compiler/setup.py). Run it on an Ascend host with CANN installed.
#
# None of this has been compiled or run: the machine it was written on has no CANN and no NPU.
#
# custom_compiler takes one flat op_host folder and one flat op_kernel folder, and copies only the
# *.cpp / *.h files in them into its own project inside the MindSpore install. So this script stages
# every op's files into two flat folders, with the shared kernels/common/moe_kernel_common.h copied
# next to them and each `#include "../../../common/moe_kernel_common.h"` rewritten to a same-folder
# include: the relative path in the source tree would not resolve inside custom_compiler's project.
set -euo pipefail

VENDOR="pangu_moe"
OPS=(moe_gating moe_gating_grad moe_dispatch_layout moe_permute moe_unpermute moe_unpermute_grad)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
COMMON_HEADER="$HERE/../common/moe_kernel_common.h"
OUT_DIR="$HERE/build_out"
SOC="ascend910b"
PYTHON="${PYTHON:-python3}"
INSTALL_PATH=""
KEEP_STAGE=0
STAGE_ONLY=""

usage() {
  cat <<EOF
Usage: kernels/ascend/build.sh [--soc SOC] [--install-path DIR] [--python PYTHON] [--keep-stage]
       kernels/ascend/build.sh --stage-only DIR

Builds the ops ${OPS[*]}
into one vendor package "$VENDOR" and copies the installer (.run) to $OUT_DIR.

  --soc SOC            SoC to compile for (custom_compiler --soc_version); default $SOC
  --install-path DIR   also install the package under DIR (custom_compiler --install_path); then
                       export ASCEND_CUSTOM_OPP_PATH=DIR/vendors/$VENDOR:\$ASCEND_CUSTOM_OPP_PATH
  --python PYTHON      the Python with MindSpore installed; default \$PYTHON or python3
  --keep-stage         keep the staging folder (it is always kept when the build fails)
  --stage-only DIR     only stage the sources into DIR/op_host and DIR/op_kernel, as the build does, and
                       stop (needs no CANN; CI checks the staging with it)

CANN: ASCEND_HOME_PATH must point at the CANN toolkit. If it is unset, the script sources the first of
\$ASCEND_SET_ENV, /usr/local/Ascend/ascend-toolkit/set_env.sh, /usr/local/Ascend/cann/set_env.sh that exists.
EOF
}

die() {
  echo "build.sh: error: $*" >&2
  exit 1
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --soc) [[ $# -ge 2 ]] || die "--soc needs a value"; SOC="$2"; shift 2 ;;
    --install-path) [[ $# -ge 2 ]] || die "--install-path needs a value"; INSTALL_PATH="$2"; shift 2 ;;
    --python) [[ $# -ge 2 ]] || die "--python needs a value"; PYTHON="$2"; shift 2 ;;
    --keep-stage) KEEP_STAGE=1; shift ;;
    --stage-only) [[ $# -ge 2 ]] || die "--stage-only needs a folder"; STAGE_ONLY="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

# --- staging ------------------------------------------------------------------------------------
# stage_sources DIR: every op's op_host / op_kernel files into DIR/op_host and DIR/op_kernel, the shared
# header beside them and its includes rewritten to the same folder.
stage_sources() {
  local stage="$1" op part src dst
  [[ -f "$COMMON_HEADER" ]] || die "$COMMON_HEADER not found"
  mkdir -p "$stage/op_host" "$stage/op_kernel"
  for op in "${OPS[@]}"; do
    for part in op_host op_kernel; do
      [[ -d "$HERE/$op/$part" ]] || die "missing $HERE/$op/$part"
      for src in "$HERE/$op/$part"/*.cpp "$HERE/$op/$part"/*.h; do
        [[ -e "$src" ]] || continue
        dst="$stage/$part/$(basename "$src")"
        [[ ! -e "$dst" ]] || die "two ops stage the same file name $part/$(basename "$src")"
        sed 's|^#include "\(\.\./\)*common/moe_kernel_common\.h"|#include "moe_kernel_common.h"|' "$src" >"$dst"
      done
    done
  done
  cp "$COMMON_HEADER" "$stage/op_host/moe_kernel_common.h"
  cp "$COMMON_HEADER" "$stage/op_kernel/moe_kernel_common.h"
  if grep -n 'include ".*\.\./.*moe_kernel_common\.h"' "$stage"/op_host/* "$stage"/op_kernel/*; then
    die "an include of moe_kernel_common.h was not rewritten (see above)"
  fi
}

if [[ -n "$STAGE_ONLY" ]]; then
  stage_sources "$STAGE_ONLY"
  echo "build.sh: staged ${OPS[*]} into $STAGE_ONLY/op_host and $STAGE_ONLY/op_kernel"
  exit 0
fi

# --- CANN ---------------------------------------------------------------------------------------
if [[ -z "${ASCEND_HOME_PATH:-}" ]]; then
  for candidate in "${ASCEND_SET_ENV:-}" /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/cann/set_env.sh; do
    if [[ -n "$candidate" && -f "$candidate" ]]; then
      echo "build.sh: ASCEND_HOME_PATH is unset; sourcing $candidate"
      set +u  # CANN's set_env.sh reads variables that may be unset
      # shellcheck disable=SC1090
      source "$candidate"
      set -u
      break
    fi
  done
fi
if [[ -z "${ASCEND_HOME_PATH:-}" ]]; then
  die "CANN not found: ASCEND_HOME_PATH is unset and no set_env.sh was found.
  Install the CANN toolkit (Ascend910B, CANN 8.x), then either
    source /usr/local/Ascend/ascend-toolkit/set_env.sh     # or <your CANN>/set_env.sh
  or point ASCEND_SET_ENV at your set_env.sh, and run this script again."
fi
[[ -d "$ASCEND_HOME_PATH" ]] || die "ASCEND_HOME_PATH=$ASCEND_HOME_PATH is not a directory (source your CANN set_env.sh)"
# custom_compiler builds from one of these CANN project templates.
if [[ ! -d "$ASCEND_HOME_PATH/tools/op_project_templates/ascendc/customize" &&
      ! -d "$ASCEND_HOME_PATH/tools/msopgen/template/operator_demo_projects/ascendc_operator_sample" ]]; then
  die "ASCEND_HOME_PATH=$ASCEND_HOME_PATH has no Ascend C op project template
  (tools/op_project_templates/ascendc/customize or tools/msopgen/template/...): is it the CANN *toolkit*?"
fi
command -v cmake >/dev/null 2>&1 || die "cmake not found: the CANN op project builds with CMake (>= 3.16)"

# --- MindSpore's custom_compiler -----------------------------------------------------------------
# find_spec locates the package without importing it (importing MindSpore takes seconds).
MS_DIR="$("$PYTHON" -c 'import importlib.util, os, sys
spec = importlib.util.find_spec("mindspore")
sys.exit(1) if spec is None or spec.origin is None else print(os.path.dirname(spec.origin))')" ||
  die "MindSpore is not installed for $PYTHON (pass --python, or set PYTHON)"
COMPILER_DIR="$MS_DIR/lib/plugin/ascend/custom_compiler"
SETUP="$COMPILER_DIR/setup.py"
[[ -f "$SETUP" ]] || die "$SETUP not found: this MindSpore has no bundled custom_compiler (MindSpore >= 2.5 for Ascend)"
# setup.py generates its CMake project inside the MindSpore install.
[[ -w "$COMPILER_DIR" ]] || die "$COMPILER_DIR is not writable: custom_compiler builds its project there
  (use a MindSpore installed in a virtualenv you own, or run as its owner)"

if [[ -n "$INSTALL_PATH" ]]; then
  mkdir -p "$INSTALL_PATH"
  INSTALL_PATH="$(cd "$INSTALL_PATH" && pwd)"
fi

# --- stage --------------------------------------------------------------------------------------
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/pangu_moe_ascend.XXXXXX")"
BUILD_OK=0
cleanup() {
  if [[ "$BUILD_OK" == 1 && "$KEEP_STAGE" == 0 ]]; then
    rm -rf "$STAGE"
  else
    echo "build.sh: staging folder kept: $STAGE (custom_compiler's log: $STAGE/build.log)" >&2
  fi
}
trap cleanup EXIT

stage_sources "$STAGE"

# --- build --------------------------------------------------------------------------------------
ARGS=(--op_host_path "$STAGE/op_host" --op_kernel_path "$STAGE/op_kernel" --vendor_name "$VENDOR"
      --soc_version "$SOC" --ascend_cann_package_path "$ASCEND_HOME_PATH")
[[ -z "$INSTALL_PATH" ]] || ARGS+=(--install_path "$INSTALL_PATH")
echo "build.sh: building ${OPS[*]} for $SOC with $SETUP"
# setup.py writes build.log / install.log into its working folder: keep them with the staged sources.
(cd "$STAGE" && "$PYTHON" "$SETUP" "${ARGS[@]}") || die "custom_compiler failed; its log is $STAGE/build.log"

shopt -s nullglob
RUNS=("$COMPILER_DIR/CustomProject/build_out/"*.run)
shopt -u nullglob
[[ ${#RUNS[@]} -gt 0 ]] || die "custom_compiler reported success but left no .run in $COMPILER_DIR/CustomProject/build_out"
mkdir -p "$OUT_DIR"
cp "${RUNS[@]}" "$OUT_DIR/"
BUILD_OK=1

RUN_FILE="$OUT_DIR/$(basename "${RUNS[0]}")"
echo
echo "build.sh: built the vendor package \"$VENDOR\": $RUN_FILE"
if [[ -n "$INSTALL_PATH" ]]; then
  echo "Installed under $INSTALL_PATH. Make it visible to MindSpore / CANN with:"
  echo "  export ASCEND_CUSTOM_OPP_PATH=$INSTALL_PATH/vendors/$VENDOR:\${ASCEND_CUSTOM_OPP_PATH:-}"
else
  echo "Install it, either into CANN's own opp folder (\$ASCEND_OPP_PATH/vendors/$VENDOR):"
  echo "  bash $RUN_FILE"
  echo "or into a folder of your choice, then point ASCEND_CUSTOM_OPP_PATH at it:"
  echo "  bash $RUN_FILE --install-path=<DIR>"
  echo "  source <DIR>/vendors/$VENDOR/bin/set_env.bash   # or:"
  echo "  export ASCEND_CUSTOM_OPP_PATH=<DIR>/vendors/$VENDOR:\${ASCEND_CUSTOM_OPP_PATH:-}"
  echo "(or rerun this script with --install-path <DIR>)."
fi
echo "Then run with runtime.kernels: custom on an Ascend device; the op names are"
echo "  MoeGating MoeGatingGrad MoeDispatchLayout MoePermute MoeUnpermute MoeUnpermuteGrad"
