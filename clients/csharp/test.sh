#!/usr/bin/env bash
# Compiles the library with Mono's mcs (C# 7.2, the .NET Standard 2.0 surface) and runs the
# tests under mono. Usage: ./test.sh [name-filter]
set -euo pipefail
cd "$(dirname "$0")"
command -v mcs >/dev/null || { echo "mcs not found: apt-get install mono-mcs" >&2; exit 1; }
mkdir -p build
mcs -nologo -langversion:7.2 -warnaserror+ -target:library -out:build/Tether.dll -r:System.dll src/*.cs
mcs -nologo -langversion:7.2 -warnaserror+ -target:exe -out:build/Tests.exe -r:build/Tether.dll -r:System.dll -r:System.Core.dll tests/*.cs
mcs -nologo -langversion:7.2 -warnaserror+ -target:exe -out:build/LabClient.exe -r:build/Tether.dll lab/LabClient.cs
mcs -nologo -langversion:7.2 -warnaserror+ -target:exe -out:build/Bench.exe -r:build/Tether.dll -r:System.Core.dll bench/Bench.cs
exec mono --debug build/Tests.exe "$@"
