#!/bin/bash
# usage: bash bench/startup.sh DIR (a checkout; PY: the interpreter, default .venv/bin/python)  -> wall times of --help, 1-token generate, serve until healthy (3 runs each)
PY=${PY:-.venv/bin/python}; PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
cd "$1"
t() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1; local e=$(date +%s.%N); echo "$(echo "$e - $s" | bc)"; }
echo "help: $(for i in 1 2 3; do t $PY -m flexserve.cli --help; done | tr '\n' ' ')"
echo "generate: $(for i in 1 2 3; do t $PY -m flexserve.cli generate --max-tokens 1 --device cpu Hi; done | tr '\n' ' ')"
for i in 1 2 3; do
  port=$((18200 + i))
  s=$(date +%s.%N)
  $PY -m flexserve.cli serve --device cpu --port $port > /tmp/serve_$i.log 2>&1 &
  pid=$!
  until curl -sf http://127.0.0.1:$port/health >/dev/null 2>&1; do sleep 0.05; done
  e=$(date +%s.%N)
  rss=$(ps -o rss= -p $pid)
  kill -INT $pid; wait $pid
  echo "serve healthy: $(echo "$e - $s" | bc) s, RSS $((rss / 1024)) MiB"
done
