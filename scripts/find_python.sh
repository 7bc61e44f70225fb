# Sourced by the set-up scripts: prints the path of a Python 3.12 interpreter, or fails.
find_python() {
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      "$c" -c 'import sys; print(sys.executable)'
      return 0
    fi
  done
  echo "Python 3.12 not found: install it (e.g. pyenv install 3.12) and retry" >&2
  return 1
}
