#!/usr/bin/env bash
# Opens a run's report/index.html in headless Chromium (Debian: apt-get install -y chromium):
# prints how many <img> loaded out of how many, writes a screenshot beside the page, and exits 1
# when any image is broken.   Usage: launch/check_report_page.sh <workdir>
set -euo pipefail
page="$(cd "$1/report" && pwd)/index.html"
browser="$(command -v chromium || command -v chromium-browser)"
flags=(--headless --no-sandbox --disable-gpu --allow-file-access-from-files --virtual-time-budget=10000)
"$browser" "${flags[@]}" --window-size=1400,4000 --screenshot="$(dirname "$page")/screenshot.png" \
    "file://$page" 2>/dev/null
ok="$("$browser" "${flags[@]}" --dump-dom "file://$page" 2>/dev/null \
      | grep -o 'data-images-ok="[0-9]*/[0-9]*"' | grep -o '[0-9]*/[0-9]*')"
echo "images loaded: $ok; screenshot: $(dirname "$page")/screenshot.png"
[ "${ok%/*}" = "${ok#*/}" ]
