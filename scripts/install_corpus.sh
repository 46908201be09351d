#!/usr/bin/env bash
# Installs the Debian packages the embedded default corpus is built from: fortunes-zh (Chinese) and fortunes (English).
set -u
have() { [ -e /usr/share/games/fortunes/tang300 ]; }
if [ -e /usr/share/games/fortunes/fortunes ] && have; then exit 0; fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
if command -v apt-get >/dev/null; then
  $SUDO apt-get install -y -q fortunes fortunes-zh >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q fortunes fortunes-zh >/dev/null 2>&1; }
fi
if [ -e /usr/share/games/fortunes/fortunes ]; then echo "default corpus packages: installed"; exit 0; fi
echo "could not install the default corpus packages; run: sudo apt-get install fortunes fortunes-zh (or pass --chinese-path/--english-path)" >&2
exit 1
