#!/usr/bin/env bash
# How the models in models/ were made: simulate the training cases, train the three architectures for FDG brain
# and FDG whole body (dose-aware: one network serves every count level), register them, copy them to models/.
#
#   bash training/recipes/shipped_models.sh WORK_DIR [MODELS_DIR]
#
# WORK_DIR keeps the simulated cases (sim/), the training runs (runs/, checkpoints: run the script again to
# continue a stopped run) and a scratch registry (store/). MODELS_DIR (default: the repository's models/) gets
# <name>/<version>/{card.yaml,weights.pt}, which the node registers on first start. Needs the real sarcoma series
# (PETNODE_REALDATA, default ../shared/data). Device: DEVICE (default auto: CUDA when present). Epochs: the
# *_EPOCHS variables. Widths and epochs are sized for the 2-core CPU of the development machine (about 35 min of
# simulation and 75 min of training there; the papers' 64 features and hundreds of epochs need a GPU) and for CPU
# inference in the node (a whole-body series in seconds, not minutes).
#
# Never here: the held-out ACRIN study (the real anatomy every learned method reports on; real_phantom refuses
# it), the bench seeds (90001 and up) and the brain MR series (prior pairing only).
set -euo pipefail
WORK=${1:?usage: shipped_models.sh WORK_DIR [MODELS_DIR]}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
MODELS=${2:-$HERE/models}
DATA=${PETNODE_REALDATA:-$HERE/../shared/data}
SARCOMA=$DATA/mirp_tcia_sts_001_fdg_pet/PT_AC
DEVICE=${DEVICE:-auto}
VERSION=${VERSION:-1.0.0}
LEVELS=1,0.3,0.1,0.03,0.01        # simulated: full counts and four lower levels (fractions of the full counts)
TRAIN_LEVELS=0.3,0.1,0.03,0.01    # network inputs; brain 3, 1, 0.3, 0.1 M counts per 2 mm slice (full 10 M)
mkdir -p "$WORK/sim" "$WORK/runs" "$WORK/store"
cd "$WORK"

sim() {  # sim NAME PHANTOM SEED [--series DIR]
  local name=$1 phantom=$2 seed=$3; shift 3
  [ -f "sim/$name/meta.json" ] || petnode simulate "$phantom" --size full --seed "$seed" --count-levels "$LEVELS" \
    --realizations 1 --device "$DEVICE" --out "sim/$name" --no-progress "$@"
}
for s in 1 2 3 4 5 6 7; do sim "brain-$s" brain "$s"; done                    # MNI152 brains, deformed per seed
for s in 1 2 3 4 5 6 7; do sim "real-$s" real "$s" --series "$SARCOMA"; done  # a real patient, transformed per seed
for s in 1 2 3 4; do sim "torso-$s" torso "$s"; done                          # parametric trunk with lesions
# Not the NEMA IQ phantom: its 247 mm along z do not fill the whole-body grid's 600 mm (real_phantom refuses it).

BRAIN=(--sim sim/brain-1 --sim sim/brain-2 --sim sim/brain-3 --sim sim/brain-4 --sim sim/brain-5 --sim sim/brain-6
       --val sim/brain-7)
WB=(--sim sim/real-1 --sim sim/real-2 --sim sim/real-3 --sim sim/real-4 --sim sim/real-5 --sim sim/real-6
    --sim sim/torso-1 --sim sim/torso-2 --sim sim/torso-3
    --val sim/real-7 --val sim/torso-4)

train() {  # train NAME ARCH EPOCHS DESCRIPTION DATA_AND_NET_OPTIONS...
  local name=$1 arch=$2 epochs=$3 description=$4; shift 4
  if [ -f "$MODELS/$name/$VERSION/card.yaml" ]; then echo "$name@$VERSION already in $MODELS"; return; fi
  [ -f "store/models/$name/$VERSION/card.yaml" ] || petnode train --arch "$arch" "$@" --net level_input=true \
    --level "$TRAIN_LEVELS" --epochs "$epochs" --batch 16 --patch 64 --device "$DEVICE" --tracer FDG \
    --description "$description" --out "runs/$name" --register "$name@$VERSION" --data-dir store
  mkdir -p "$MODELS/$name"
  cp -r "store/models/$name/$VERSION" "$MODELS/$name/$VERSION"
  rm -f "$MODELS/$name/$VERSION/RETIRED"
  cp "runs/$name/loss.png" "$MODELS/$name/$VERSION/loss.png"
}
BT="FDG brain PET, 2 mm voxels, every count level"
WT="FDG whole-body PET, 4 mm voxels (other grids resampled), every count level"
train fdg-brain-xu   xu-unet     "${XU_BRAIN_EPOCHS:-8}"   "$BT" "${BRAIN[@]}" --net features=32
train fdg-brain-fo   fo-dcnn     "${FO_BRAIN_EPOCHS:-6}"   "$BT" "${BRAIN[@]}" --net features=48
train fdg-brain-gong gong-resnet "${GONG_BRAIN_EPOCHS:-6}" "$BT" "${BRAIN[@]}" --net features=32
train fdg-wb-xu      xu-unet     "${XU_WB_EPOCHS:-4}"      "$WT" "${WB[@]}" --net features=32
train fdg-wb-fo      fo-dcnn     "${FO_WB_EPOCHS:-3}"      "$WT" "${WB[@]}" --net features=48
train fdg-wb-gong    gong-resnet "${GONG_WB_EPOCHS:-4}"    "$WT" "${WB[@]}" --net features=32
du -sh "$MODELS"
