# Sourced by the device session scripts (bench/gpu_session.sh, bench/cpu_device_session.sh):
#   step NAME SECONDS CMD...   runs CMD under its own time limit, its log in $W/NAME.log, start and
# end (the step's own exit status and seconds) in $W/progress; with STEPS set, only the steps it names.
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "${STEPS:-}" ]; then case " $STEPS " in *" $name "*) ;; *) return ;; esac; fi
  echo "$(date +%T) start $name" >>"$W/progress"
  local t0=$SECONDS rc
  timeout "$limit" "$@" >"$W/$name.log" 2>&1
  rc=$?  # the step's own status (a $? inside the echo would read date's)
  echo "$(date +%T) end $name rc=$rc $((SECONDS - t0))s" >>"$W/progress"
}
