"""Joints of one person per image, for images, folders, globs and videos, in batches.

    cpm-predict --checkpoint runs/lspet/best.pt photo.jpg                 # prints the JSON record
    cpm-predict --checkpoint best.pt photos/ 'more/*.jpg' --out predictions/ --draw
    cpm-predict --model models:/cpm-lspet/1 clip.mp4 --out predictions/   # a model a sweep logged
    python -m pipeline.predict ...                                        # the same command

Each image's crop is the evaluation crop (no ground truth): centred on the image centre (or
--center) with a side derived from the image size. A record per image: {"image": its path,
"image_size": [H, W], "joints": per joint its name, x and y in ORIGINAL image pixels and its
confidence (the peak of its belief map)}; per video frame {"video", "frame", "time_s", ...}.
Without --out the records go to stdout, one JSON object a line. With --out DIR: DIR/NAME.json
per image, DIR/NAME.jsonl per video (a line a frame) and with --draw the skeleton drawn on each
image (DIR/NAME.png) or video (DIR/NAME.mp4). --batch-size images go through the model at once
(--device, default CUDA when present); files are decoded while the model runs. A file that cannot
be read is skipped and named in the summary (stderr); the exit status is 0 unless nothing could be
read. A video that cannot be opened is bad input (exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.cli import UsageError, report_input_errors
from pipeline.predict_inputs import expand_inputs
from pipeline.predict_outputs import Outputs, Tally
from pipeline.predictor import DEFAULT_BATCH_SIZE, default_device, read_image


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cpm-predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (their images and videos), globs ('photos/*.jpg') or videos")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="checkpoint file (best.pt) or its directory")
    weights.add_argument("--model", help="an MLflow model a sweep logged: models:/NAME/VERSION or runs:/RUN_ID/model")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for --model "
                        "(default: MLFLOW_TRACKING_URI or the embedded SQLite store)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write DIR/NAME.json per image and DIR/NAME.jsonl per video (default: records to stdout)")
    parser.add_argument("--draw", action="store_true", help="with --out: the skeleton on each image (PNG) "
                        "and video (MP4)")
    parser.add_argument("--device", default=None, help=f"cpu, cuda, cuda:1 ... (default here: {default_device()})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per forward pass")
    parser.add_argument("--center", default=None, help="person centre X,Y in original pixels (every image)")
    parser.add_argument("--flip", action="store_true", help="average with the mirrored crop")
    parser.add_argument("--maps", default=None, metavar="PNG",
                        help="one image only: save the belief maps of every stage into this PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report_input_errors(lambda: predict_to_outputs(args))


def parse_center(text: str | None) -> np.ndarray | None:
    if text is None:
        return None
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--center must look like X,Y (original pixels), got {text!r}") from None
    return np.array([x, y])


def check_arguments(args, inputs) -> None:
    if args.draw and not args.out:
        raise UsageError("--draw writes into the --out folder: give --out DIR")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.maps and (len(inputs.images) != 1 or inputs.videos):
        raise UsageError("--maps draws the belief maps of one image: give exactly one image")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; expected a folder (made when missing)")


def make_predictor(args):
    from pipeline.predictor import load

    try:
        return load(args.model or args.checkpoint, device=args.device, batch_size=args.batch_size, flip=args.flip,
                    tracking_uri=args.tracking_uri)
    except ValueError as exc:  # flip without pairs, a device torch does not know
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:  # e.g. --device cuda on a machine without CUDA
        raise UsageError(f"--device {args.device}: {exc}") from None


def predict_to_outputs(args) -> int:
    center = parse_center(args.center)
    predictor = make_predictor(args)  # a bad checkpoint is named before the inputs are looked at
    inputs = expand_inputs(args.inputs)
    check_arguments(args, inputs)
    tally = Tally(start=time.perf_counter())
    outputs = Outputs(args.out, args.draw, args.maps, predictor.joint_names)
    with tally.progress(inputs, quiet=args.quiet):
        predict_image_files(predictor, inputs.images, outputs, tally, center)
        for path in inputs.videos:
            predict_video(predictor, path, outputs, tally, center)
    if tally.predicted == 0:
        raise UsageError(f"nothing could be read: {tally.skipped_text()}")
    print(tally.summary(predictor), file=sys.stderr)
    return 0


def try_read(path: Path) -> tuple[np.ndarray | None, str | None]:
    try:
        return read_image(path), None
    except (FileNotFoundError, OSError) as exc:
        return None, str(exc)


def predict_image_files(predictor, paths: list[Path], outputs: Outputs, tally: Tally, center) -> None:
    """Batches of `predictor.batch_size` images; the next batch is decoded in two threads while
    the model runs this one (OpenCV releases the GIL while it decodes)."""
    from concurrent.futures import ThreadPoolExecutor

    names = outputs.names_for(paths)
    batches = [range(i, min(i + predictor.batch_size, len(paths))) for i in range(0, len(paths), predictor.batch_size)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        submit = lambda rows: [pool.submit(try_read, paths[i]) for i in rows]  # noqa: E731
        pending = submit(batches[0]) if batches else []
        for index, rows in enumerate(batches):
            loaded = [future.result() for future in pending]
            pending = submit(batches[index + 1]) if index + 1 < len(batches) else []
            good = [(i, image) for i, (image, error) in zip(rows, loaded) if tally.read(paths[i], error)]
            if good:
                arrays = [image for _, image in good]
                results = predictor.predict_arrays(arrays, None if center is None else [center] * len(arrays))
                for (i, image), result in zip(good, results):
                    record = {"image": str(paths[i]), **predictor.record(image, result)}
                    outputs.image(paths[i], names[i], image, record, result)
            tally.advance(len(rows), images=len(good))


def read_frames(capture, count: int) -> list[np.ndarray]:
    import cv2

    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    return frames


def predict_video(predictor, path: Path, outputs: Outputs, tally: Tally, center) -> None:
    """Every frame of a video, `batch_size` frames per forward pass, into one JSON Lines file (and
    an MP4 with the skeletons drawn, with --draw)."""
    import cv2

    from pipeline.predict_inputs import open_video

    capture = open_video(path)
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    frame = 0
    with outputs.video(path, fps) as stream:
        while frames := read_frames(capture, predictor.batch_size):
            results = predictor.predict_arrays(frames, None if center is None else [center] * len(frames))
            for image, result in zip(frames, results):
                record = {"video": str(path), "frame": frame, "time_s": round(frame / fps, 3),
                          **predictor.record(image, result)}
                stream.write(image, record, result)
                frame += 1
            tally.advance(len(frames), frames=len(frames))
    capture.release()
    if frame == 0:
        tally.read(path, f"video {path} has no frame that could be decoded")


if __name__ == "__main__":
    sys.exit(main())
