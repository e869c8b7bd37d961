#!/usr/bin/env bash
# The main job on the built-in corpus, about 18 minutes on 2 CPU cores:
# prepare data -> pretrain (10 min) -> SFT (3 min) on review sentiment -> LoRA from the pretrained base ->
# held-out accuracy of all three next to the majority baseline, SFT and LoRA beside TF-IDF logistic
# regression (bench/bench_sentiment.py) on the same split -> loss plots -> generated samples ->
# the base and its adapter exported to .bin files and run in the C engine.
set -euo pipefail
cd "$(dirname "$0")"

python data.py
python train.py -m config/nano-small.json -t config/pretrain.json
python train.py -t config/sft.json
python train.py -t config/lora.json

echo "== held-out sentiment accuracy (dataset/sentiment/test.jsonl)"
python eval.py -m checkpoint/pretrain/best.pt --sentiment
python eval.py -m checkpoint/sft/best.pt --sentiment --json > checkpoint/sft/sentiment.json
python eval.py -m checkpoint/pretrain/best.pt -l checkpoint/lora/best.pt --sentiment --json > checkpoint/lora/sentiment.json
echo "== the SFT and LoRA models beside classical baselines on the same split"
python bench/bench_sentiment.py --beside "SFT (checkpoint/sft/best.pt)=checkpoint/sft/sentiment.json" \
    --beside "LoRA (checkpoint/lora/best.pt)=checkpoint/lora/sentiment.json"

for run in pretrain sft lora; do
    python plot_loss.py -n "checkpoint/$run/train_$run.log" -o "checkpoint/$run/loss.png"
done
echo "== generated samples: the pretrained model continues, the SFT model answers"
python infer.py -m checkpoint/pretrain/best.pt --prompt "中国经济" -s 100 --seed 1
python infer.py -m checkpoint/sft/best.pt -i --prompt "质量很好，物流也快，很满意" -t 0
echo "== the pretrained model and its LoRA adapter, exported, in the C engine"
python export.py checkpoint/pretrain/model.bin --checkpoint checkpoint/pretrain/best.pt
python export.py checkpoint/lora/lora.bin --lora checkpoint/lora/best.pt
infer_c/infer checkpoint/pretrain/model.bin -l checkpoint/lora/lora.bin -i "质量很好，物流也快，很满意" -t 0
