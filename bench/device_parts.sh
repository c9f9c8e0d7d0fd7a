# Sourced by the bench/device_run*.sh scripts (one nvidia-h200 call, several parts).
#   RUN=run13 OUT=... ; source bench/device_parts.sh ; part NAME LIMIT_S COMMAND...
# Each part runs in its own process under a time limit, its output in $R/${RUN}_NAME.log; its exit
# status and seconds go to $R/parts.txt, and everything so far is packed into $OUT/results.tar.gz
# after each part (the device tool returns at most 8 files, and a later part may run out of time).
R=$OUT/r
mkdir -p "$R"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
part() {  # NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 start=$(date +%s) rc
  shift 2
  timeout "$limit" "$@" > "$R/${RUN}_$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - start )) s" | tee -a "$R/parts.txt"
  tar -czf "$OUT/results.tar.gz" -C "$R" .
}
