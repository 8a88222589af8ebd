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
# *_EPOCHS variables. Widths and epochs are sized for the 2-core CPU of the development machine (about 50 min of
# simulation and 90 min of training there; the papers' 64 features and hundreds of epochs need a GPU) and for CPU
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
VERSION=1.0.0
LEVELS=1,0.3,0.1,0.03,0.01        # simulated: full counts and four lower levels (fractions of the full counts)
TRAIN_LEVELS=0.3,0.1,0.03,0.01    # network inputs; brain 3, 1, 0.3, 0.1 M counts per 2 mm slice (full 10 M)
# fdg-wb-xu 1.1.0 (the default whole-body rule's model): its target has 10x the counts of the preset (4.5e9 prompts
# in the volume), so its inputs reach from a well-counted clinical series (noise index about 0.05: the real
# sarcoma and ACRIN series) down to the preset's 1 % (0.001 here). 1.0.0 was trained on the preset's 0.3-0.01
# only, and real standard-dose series fell below its range (noise index 0.17-1.87).
WB_FULL_COUNTS=4.5e9
WB_LEVELS=1,0.3,0.1,0.03,0.01,0.003,0.001
WB_TRAIN_LEVELS=0.3,0.1,0.03,0.01,0.003,0.001
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
# 1.1.0's cases at 10x the counts (fewer cases than 1.0.0: each costs 2.5 min of ML-EM on 2 cores, 15 under load)
for s in 1 2 3 4 5; do
  LEVELS=$WB_LEVELS sim "wb-real-$s" real "$s" --series "$SARCOMA" --full-counts "$WB_FULL_COUNTS"; done
LEVELS=$WB_LEVELS sim wb-torso-1 torso 1 --full-counts "$WB_FULL_COUNTS"
# Not the NEMA IQ phantom: its 247 mm along z do not fill the whole-body grid's 600 mm (real_phantom refuses it).

BRAIN=(--sim sim/brain-1 --sim sim/brain-2 --sim sim/brain-3 --sim sim/brain-4 --sim sim/brain-5 --sim sim/brain-6
       --val sim/brain-7)
WB=(--sim sim/real-1 --sim sim/real-2 --sim sim/real-3 --sim sim/real-4 --sim sim/real-5 --sim sim/real-6
    --sim sim/torso-1 --sim sim/torso-2 --sim sim/torso-3
    --val sim/real-7 --val sim/torso-4)
WB_HIGH=(--sim sim/wb-real-1 --sim sim/wb-real-2 --sim sim/wb-real-3 --sim sim/wb-real-4 --sim sim/wb-torso-1
         --val sim/wb-real-5)

train() {  # [VERSION=V] [TRAIN_LEVELS=L] train NAME ARCH EPOCHS DESCRIPTION DATA_AND_NET_OPTIONS...
  local name=$1 arch=$2 epochs=$3 description=$4; shift 4
  if [ -f "$MODELS/$name/$VERSION/card.yaml" ]; then echo "$name@$VERSION already in $MODELS"; return; fi
  [ -f "store/models/$name/$VERSION/card.yaml" ] || petnode train --arch "$arch" "$@" --net level_input=true \
    --level "$TRAIN_LEVELS" --epochs "$epochs" --batch 16 --patch 64 --device "$DEVICE" --tracer FDG \
    --description "$description" --out "runs/$name-$VERSION" --register "$name@$VERSION" --data-dir store
  mkdir -p "$MODELS/$name"
  cp -r "store/models/$name/$VERSION" "$MODELS/$name/$VERSION"
  rm -f "$MODELS/$name/$VERSION/RETIRED"
  cp "runs/$name-$VERSION/loss.png" "$MODELS/$name/$VERSION/loss.png"
}
BT="FDG brain PET, 2 mm voxels, every count level"
WT="FDG whole-body PET, 4 mm voxels (other grids resampled), every count level"
train fdg-brain-xu   xu-unet     "${XU_BRAIN_EPOCHS:-8}"   "$BT" "${BRAIN[@]}" --net features=32
train fdg-brain-fo   fo-dcnn     "${FO_BRAIN_EPOCHS:-6}"   "$BT" "${BRAIN[@]}" --net features=48
train fdg-brain-gong gong-resnet "${GONG_BRAIN_EPOCHS:-6}" "$BT" "${BRAIN[@]}" --net features=32
train fdg-wb-xu      xu-unet     "${XU_WB_EPOCHS:-4}"      "$WT" "${WB[@]}" --net features=32
# (fdg-wb-fo and fdg-wb-gong 1.0.0, trained here on WB too, are no longer shipped: 1.1.0 and 1.2.0 superseded them,
# gong 1.0.0 halved the hottest lesion of real standard-dose series, and models/ keeps under 40 MB.)
VERSION=1.1.0 TRAIN_LEVELS=$WB_TRAIN_LEVELS \
train fdg-wb-xu      xu-unet     "${XU_WB_EPOCHS:-4}"      "$WT" "${WB_HIGH[@]}" --net features=32
# The other two architectures at 1.1.0's range too (real standard-dose series are inside it), same data.
VERSION=1.1.0 TRAIN_LEVELS=$WB_TRAIN_LEVELS \
train fdg-wb-fo      fo-dcnn     "${FO_WB_EPOCHS:-3}"      "$WT" "${WB_HIGH[@]}" --net features=48
VERSION=1.1.0 TRAIN_LEVELS=$WB_TRAIN_LEVELS \
train fdg-wb-gong    gong-resnet "${GONG_WB_EPOCHS:-4}"    "$WT" "${WB_HIGH[@]}" --net features=32

# fdg-bcdpm 1.0.0: BC-DPM's score network (petnode train diffusion), trained on high-count images alone (no pairs):
# the full-count reconstructions of the six 2 mm brains (10 M counts per slice) and of the five 10x-count
# whole-body cases (30 M per slice); validation brain-7 and wb-real-5. The paper's objective, schedule, AdamW and
# weight decay; lr 2e-4 instead of its 1e-4 and half of the timesteps drawn below 400 (the practical sampler
# starts at step 40 l, 200 to 600), both for the few thousand steps a 2-core CPU gives in an hour (~1.6 steps/s).
DIFF_STEPS=${DIFF_STEPS:-5515}   # the shipped run: 58 min on one core of the 2-core CPU
if [ ! -f "$MODELS/fdg-bcdpm/1.0.0/card.yaml" ]; then
  [ -f store/models/fdg-bcdpm/1.0.0/card.yaml ] || petnode train diffusion \
    --sim sim/brain-1 --sim sim/brain-2 --sim sim/brain-3 --sim sim/brain-4 --sim sim/brain-5 --sim sim/brain-6 \
    --sim sim/wb-real-1 --sim sim/wb-real-2 --sim sim/wb-real-3 --sim sim/wb-real-4 --sim sim/wb-torso-1 \
    --val sim/brain-7 --val sim/wb-real-5 --level 1 --steps "$DIFF_STEPS" --batch 8 --patch 96 --lr 2e-4 \
    --focus-t 400 --focus-fraction 0.5 --device "$DEVICE" --tracer FDG \
    --description "FDG brain and whole-body PET, any voxel size and count level (BC-DPM diffusion prior)" \
    --out runs/fdg-bcdpm-1.0.0 --register fdg-bcdpm@1.0.0 --data-dir store
  mkdir -p "$MODELS/fdg-bcdpm"
  cp -r store/models/fdg-bcdpm/1.0.0 "$MODELS/fdg-bcdpm/1.0.0"
  rm -f "$MODELS/fdg-bcdpm/1.0.0/RETIRED"
  cp runs/fdg-bcdpm-1.0.0/loss.png "$MODELS/fdg-bcdpm/1.0.0/loss.png"
fi

# The brain models 1.1.0 (fdg-brain-xu: the default brain rule's model): each 1.0.0 continued with every layer
# trained (--fine-tune with --last past the network's depth; gong-resnet keeps its first convolution) on twice the
# brains (seeds 1-12, validation 13; the bench's 90001 and up never) against their noise-free reconstructions
# (simulate --noiseless: the same reconstruction and PSF without the target's own counting noise, so regional
# means stay the reconstruction's), at half the learning rate of a fresh run.
for s in $(seq 1 13); do LEVELS=0.3,0.1,0.03,0.01 sim "nl-brain-$s" brain "$s" --noiseless; done
NL_BRAIN=(); for s in $(seq 1 12); do NL_BRAIN+=(--sim "sim/nl-brain-$s"); done
continue_brain() {  # continue_brain NAME EPOCHS LEARNING_RATE
  local name=$1 epochs=$2 lr=$3
  if [ -f "$MODELS/$name/1.1.0/card.yaml" ]; then echo "$name@1.1.0 already in $MODELS"; return; fi
  [ -f "store/models/$name/1.1.0/card.yaml" ] || petnode train --fine-tune "$name@1.0.0" --last 99 \
    "${NL_BRAIN[@]}" --val sim/nl-brain-13 --target noiseless --level "$TRAIN_LEVELS" --epochs "$epochs" \
    --lr "$lr" --batch 16 --patch 64 --device "$DEVICE" --tracer FDG --description "$BT" \
    --out "runs/$name-1.1.0" --register "$name@1.1.0" --data-dir store
  mkdir -p "$MODELS/$name"
  cp -r "store/models/$name/1.1.0" "$MODELS/$name/1.1.0"
  rm -f "$MODELS/$name/1.1.0/RETIRED"
  cp "runs/$name-1.1.0/loss.png" "$MODELS/$name/1.1.0/loss.png"
}
continue_brain fdg-brain-xu   "${XU_BRAIN_NL_EPOCHS:-12}"   5e-4
continue_brain fdg-brain-fo   "${FO_BRAIN_NL_EPOCHS:-6}"    5e-4
continue_brain fdg-brain-gong "${GONG_BRAIN_NL_EPOCHS:-6}"  5e-4
# fdg-wb-gong and fdg-wb-fo 1.2.0: each 1.1.0 continued with every layer (gong-resnet keeps its first convolution)
# on two more parametric torsos at 10x the counts (seeds 2 and 3; the bench's 90001 and up never), so the small
# lesions in lung and liver are a larger part of the data, at half the learning rate of a fresh run.
for s in 2 3; do LEVELS=$WB_LEVELS sim "wb-torso-$s" torso "$s" --full-counts "$WB_FULL_COUNTS"; done
WB_MORE=("${WB_HIGH[@]}" --sim sim/wb-torso-2 --sim sim/wb-torso-3)
continue_wb() {  # continue_wb NAME EPOCHS
  local name=$1 epochs=$2
  if [ -f "$MODELS/$name/1.2.0/card.yaml" ]; then echo "$name@1.2.0 already in $MODELS"; return; fi
  [ -f "store/models/$name/1.2.0/card.yaml" ] || petnode train --fine-tune "$name@1.1.0" --last 99 "${WB_MORE[@]}" \
    --level "$WB_TRAIN_LEVELS" --epochs "$epochs" --lr 5e-4 --batch 16 --patch 64 --device "$DEVICE" --tracer FDG \
    --description "$WT" --out "runs/$name-1.2.0" --register "$name@1.2.0" --data-dir store
  mkdir -p "$MODELS/$name"
  cp -r "store/models/$name/1.2.0" "$MODELS/$name/1.2.0"
  rm -f "$MODELS/$name/1.2.0/RETIRED"
  cp "runs/$name-1.2.0/loss.png" "$MODELS/$name/1.2.0/loss.png"
}
continue_wb fdg-wb-gong "${GONG_WB_MORE_EPOCHS:-5}"
continue_wb fdg-wb-fo   "${FO_WB_MORE_EPOCHS:-3}"
du -sh "$MODELS"
