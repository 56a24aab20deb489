# Sourced by the end-to-end shell tests (after `set -uo pipefail`), with the test's arguments
# BINARY WORK_DIR: sets `bin`, empties `work`, exports the MPI environment of the test machines
# (root, oversubscription, yielding waits), keeps the pass/fail counters and compares logits files.
bin=$1
work=$2
rm -rf "$work" && mkdir -p "$work"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_btl=self,vader
n_pass=0
n_fail=0
pass() { n_pass=$((n_pass + 1)); }
fail() {  # fail WHAT...: counts a failure and prints it
  n_fail=$((n_fail + 1))
  echo "FAILED: $*"
}
check() {  # check NAME COMMAND...: passes when the command succeeds
  local name=$1
  shift
  if "$@"; then pass; else fail "$name"; fi
}
logits_close() {  # logits_close A B VOCAB: float32 files within 1e-4 of each row's largest |B|
  paste <(od -An -v -f -w4 "$1") <(od -An -v -f -w4 "$2") | awk -v V="$3" '
    { a[NR] = $1; b[NR] = $2; m = (b[NR] < 0 ? -b[NR] : b[NR]); r = int((NR - 1) / V);
      if (m > mx[r]) mx[r] = m }
    END { bad = 0; for (i = 1; i <= NR; i++) { r = int((i - 1) / V); d = a[i] - b[i];
            if (d < 0) d = -d; if (d > 1e-4 * mx[r]) bad++ }
          if (NR == 0 || bad) { print "  " bad " logits differ"; exit 1 } }'
}
summary() {  # summary TITLE: prints the counts; succeeds when nothing failed
  echo "$1: $n_pass passed, $n_fail failed"
  test "$n_fail" -eq 0
}
