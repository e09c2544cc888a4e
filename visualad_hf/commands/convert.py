"""`visualad convert`: the authors' released checkpoint (CLIP.pth) plus its CLIP backbone -> a model folder."""

from __future__ import annotations

import argparse
import sys

from ..convert import (
    DEFAULT_FINAL_LAYERNORM,
    FINAL_LAYERNORM_CHOICES,
    FINAL_LAYERNORM_DESCRIPTIONS,
    HUB_VIT_L14_336,
    OPENAI_VIT_L14_336_URL,
    convert_checkpoint,
    infer_training_data,
    save_converted,
)
from ..convert.converter import UPLOAD_MESSAGE
from ..hub import HubUploadError, push_folder
from ._flags import add_dtype, add_output, positive_int, torch_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone",
        required=True,
        help=f"CLIP backbone: the OpenAI ViT-L-14-336px.pt file ({OPENAI_VIT_L14_336_URL}), a plain state dict, a "
        f"Hugging Face folder, or a Hub id such as {HUB_VIT_L14_336}.",
    )
    parser.add_argument("--checkpoint", required=True, help="The authors' VisualAD checkpoint (CLIP.pth).")
    add_output(parser, help="Folder to write the converted model into (replaced as a whole once complete).")
    parser.add_argument(
        "--final-layernorm",
        choices=FINAL_LAYERNORM_CHOICES,
        default=DEFAULT_FINAL_LAYERNORM,
        help="Which final LayerNorm the model gets. 'backbone' (default): CLIP's own, as the authors' released "
        "evaluation test.py uses it (it never loads the trained one): reproduces the paper's numbers. 'checkpoint': "
        "the trained ln_post_weight/ln_post_bias of CLIP.pth, as their train.py forward uses it: to continue training.",
    )
    parser.add_argument(
        "--num-heads",
        type=positive_int,
        default=None,
        help="Attention heads of an OpenAI-layout backbone; default width // 64 (OpenAI's rule; 16 for ViT-L/14).",
    )
    add_dtype(parser, help="Saved parameter dtype (the released runs are float32).")
    parser.add_argument(
        "--training-data",
        default=None,
        help="What the checkpoint was trained on, for the model card: 'visa', 'mvtec' or free text. "
        "Read from the released folder name (train_on_visa / train_on_mvtec) when omitted.",
    )
    parser.add_argument("--model-name", default=None, help="Title of the model card.")
    parser.add_argument(
        "--push-to-hub", metavar="REPO_ID", default=None, help="Also upload the finished folder to this Hub repo."
    )
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument("--revision", default=None, help="Revision of a Hub backbone.")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one).")
    parser.set_defaults(prog=parser.prog)


def run(args: argparse.Namespace) -> int:
    converted = convert_checkpoint(
        args.backbone,
        args.checkpoint,
        final_layernorm=args.final_layernorm,
        num_heads=args.num_heads,
        dtype=torch_dtype(args.dtype),
        revision=args.revision,
        token=args.token,
    )
    training_data = args.training_data or infer_training_data(args.checkpoint)
    output = save_converted(
        converted, args.output, training_data=training_data, model_name=args.model_name, repo_id=args.push_to_hub
    )
    config = converted.model.config
    other = next(choice for choice in FINAL_LAYERNORM_CHOICES if choice != args.final_layernorm)
    print(
        f"Converted {args.checkpoint} on {converted.backbone.layout} ({args.backbone}) -> {output}\n"
        f"  width {config.hidden_size}, {config.vision_config.num_hidden_layers} layers, "
        f"{config.vision_config.num_attention_heads} heads, feature layers {config.feature_layers}, "
        f"input {config.image_size}px, {config.num_anchors} anchors, dtype {args.dtype}\n"
        f"  final LayerNorm: {args.final_layernorm}: {FINAL_LAYERNORM_DESCRIPTIONS[args.final_layernorm]} "
        f"(--final-layernorm {other} for the other one)"
    )
    if args.push_to_hub:
        try:
            url = push_folder(
                output, args.push_to_hub, token=args.token, private=args.private, commit_message=UPLOAD_MESSAGE
            )
        except HubUploadError as error:  # the folder is complete: a partial success, exit status 1
            print(f"{args.prog}: error: {error}", file=sys.stderr)
            return 1
        print(f"Pushed to {url}")
    return 0
