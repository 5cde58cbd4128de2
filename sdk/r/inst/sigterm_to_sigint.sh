#!/bin/sh
# Run an R model container and turn SIGTERM into SIGINT for it.
#
#   sh sdk/r/inst/sigterm_to_sigint.sh Rscript my_model.R --broker tcp://...
#
# R has no R-level SIGTERM handler: SIGTERM ends R at once, without Goodbye. ketch_serve
# drains on SIGINT (Ready{credits: 0}, finish held batches, Goodbye), so this wrapper
# forwards SIGTERM (and SIGINT) as SIGINT and exits with the container's status.
"$@" &
child=$!
trap 'kill -INT "$child" 2>/dev/null' TERM INT
# wait returns early when a trapped signal arrives; wait again until the child is gone
while :; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || break
done
exit "$status"
