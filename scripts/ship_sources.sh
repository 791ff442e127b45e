#!/usr/bin/env bash
# Reproduces the sources shipped in trainers/builtin/ (the embedded default's models), with the
# project's own commands. Hours on two CPU cores (the DDPM and the StyleGAN2 most of it); minutes on
# a GPU. Each step is cached, so the script can be interrupted and run again.
set -euo pipefail
cd "$(dirname "$0")/.."
O=.venv/bin/orchestrate
$O pretrain-classifier --export trainers/builtin/classifier-synthetic-32.safetensors
$O pretrain-encoder --task tasks/sources/encoder-synthetic-32.yaml \
   --export trainers/builtin/encoder-synthetic-32.safetensors
$O pretrain ddpm --task tasks/sources/ddpm-synthetic-32.yaml --export trainers/builtin/ddpm-synthetic-32
$O pretrain stylegan2 --task tasks/sources/stylegan2-synthetic-32.yaml --export trainers/builtin/stylegan2-synthetic-32
