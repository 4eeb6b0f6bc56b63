//! Each augmentation on known images (gradients, constant planes), the eval pipeline against
//! `eval_transform`, and the batch-level MixUp / CutMix / label smoothing.

use std::path::Path;

use image::{Rgb, RgbImage};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use resnet_rs::data::transforms::{
    BatchMix, Mixed, Op, Pipeline, RandomErasing, random_resized_crop_params, to_tensor,
};
use resnet_rs::infer::preprocess::{IMAGENET_MEAN, IMAGENET_STD, eval_transform, load_rgb, resize_bilinear_pil};
use resnet_rs::{Image, Tensor};

fn rng(seed: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(seed)
}

/// R = 4x, G = 5y, B = 100 + x + y: every pixel of a 64x48 image different, nothing black.
fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(4 * x) as u8, (5 * y) as u8, (100 + x + y) as u8]))
}

fn random_image(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut r = rng(seed);
    RgbImage::from_fn(w, h, |_, _| Rgb([r.random(), r.random(), r.random()]))
}

fn one_op(op: Op, img: &RgbImage, seed: u64) -> RgbImage {
    let pipeline = Pipeline { ops: vec![op], ..Pipeline::normalize(&[0.0; 3], &[1.0; 3]) };
    pipeline.apply_ops(&Image::from_rgb(img), &mut rng(seed)).to_rgb().expect("an RGB image")
}

#[test]
fn flip_mirrors_pixels() {
    let img = gradient(64, 48);
    let flipped = one_op(Op::HorizontalFlip { p: 1.0 }, &img, 0);
    for (x, y, px) in flipped.enumerate_pixels() {
        assert_eq!(px, img.get_pixel(63 - x, y));
    }
    assert_eq!(one_op(Op::HorizontalFlip { p: 0.0 }, &img, 0), img);
    // p = 0.5 flips about half the time.
    let flips = (0..200).filter(|&s| one_op(Op::HorizontalFlip { p: 0.5 }, &img, s) != img).count();
    assert!((70..130).contains(&flips), "{flips} flips in 200");
}

#[test]
fn crop_with_padding_puts_zeros_in_the_border_and_keeps_the_rest() {
    let img = gradient(8, 8);
    let mut offsets = std::collections::HashSet::new();
    for seed in 0..300 {
        let out = one_op(Op::RandomCrop { size: 8, padding: 2 }, &img, seed);
        assert_eq!(out.dimensions(), (8, 8));
        // Find the shift from the first non-black pixel's position, then check every pixel against it.
        let (x0, y0, px) = out.enumerate_pixels().find(|(_, _, p)| p.0 != [0; 3]).expect("content");
        let (sx, sy) = ((px.0[0] / 4) as i32, (px.0[1] / 5) as i32);
        let (dx, dy) = (sx - x0 as i32, sy - y0 as i32);
        assert!((-2..=2).contains(&dx) && (-2..=2).contains(&dy), "shift {dx},{dy}");
        for (x, y, p) in out.enumerate_pixels() {
            let (ox, oy) = (x as i32 + dx, y as i32 + dy);
            if (0..8).contains(&ox) && (0..8).contains(&oy) {
                assert_eq!(p, img.get_pixel(ox as u32, oy as u32));
            } else {
                assert_eq!(p.0, [0; 3], "border at ({x}, {y}) with shift {dx},{dy}");
            }
        }
        offsets.insert((dx, dy));
    }
    assert_eq!(offsets.len(), 25, "every offset of the 12x12 padded image is drawn");
    // No padding and the same size: identity. Bigger than the image: padded as pad_if_needed does.
    assert_eq!(one_op(Op::RandomCrop { size: 8, padding: 0 }, &img, 1), img);
    let big = one_op(Op::RandomCrop { size: 12, padding: 0 }, &img, 1);
    assert_eq!(big.dimensions(), (12, 12));
    assert_eq!(big.pixels().filter(|p| p.0 != [0; 3]).count(), 64); // the gradient has no black pixel
}

#[test]
fn random_resized_crop_is_a_scaled_sub_window() {
    let img = gradient(64, 48);
    let (scale, ratio) = ((0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0));
    for seed in 0..100 {
        let op = Op::RandomResizedCrop { size: 16, scale, ratio };
        let out = one_op(op, &img, seed);
        assert_eq!(out.dimensions(), (16, 16));
        // The op draws exactly what get_params draws: replay them and compare with the window resized.
        let (top, left, h, w) = random_resized_crop_params(64, 48, scale, ratio, &mut rng(seed));
        assert!(top + h <= 48 && left + w <= 64 && h > 0 && w > 0);
        let window = image::imageops::crop_imm(&img, left, top, w, h).to_image();
        assert_eq!(out, resize_bilinear_pil(&window, 16, 16), "seed {seed}");
        // Area and aspect ratio within the ranges (up to the rounding of w and h).
        let area = f64::from(w * h) / (64.0 * 48.0);
        assert!(area > 0.08 * 0.8 && area <= 1.0, "area {area}");
        let aspect = f64::from(w) / f64::from(h);
        assert!(aspect > 0.75 * 0.85 && aspect < 4.0 / 3.0 * 1.15, "aspect {aspect}");
        // Content: red grows left to right and green top to bottom, within the window's range.
        let (first, last) = (out.get_pixel(0, 8).0[0], out.get_pixel(15, 8).0[0]);
        assert!(first < last || w == 1);
        assert!(u32::from(first) >= 4 * left && u32::from(last) <= 4 * (left + w - 1));
    }
    // An impossible scale falls back to the central crop, here the whole image (4/3 is within ratio).
    let (top, left, h, w) = random_resized_crop_params(64, 48, (2.0, 3.0), ratio, &mut rng(0));
    assert_eq!((top, left, h, w), (0, 0, 48, 64));
    // A wide image with a narrow allowed ratio: central crop of ratio max(ratio).
    assert_eq!(random_resized_crop_params(100, 10, (2.0, 3.0), (1.0, 2.0), &mut rng(0)), (0, 40, 10, 20));
}

#[test]
fn color_jitter_zero_is_identity_and_brightness_scales_within_range() {
    let img = random_image(16, 16, 7);
    let zero = Op::ColorJitter { brightness: 0.0, contrast: 0.0, saturation: 0.0, hue: 0.0 };
    for seed in 0..10 {
        assert_eq!(one_op(zero.clone(), &img, seed), img);
    }
    // Brightness b: every value multiplied by one factor in [1 - b, 1 + b] (up to the rounding to bytes).
    let flat = RgbImage::from_fn(8, 8, |x, y| Rgb([100 + x as u8, 60 + y as u8, 120]));
    let (mut lo, mut hi) = (f32::MAX, f32::MIN);
    for seed in 0..200 {
        let op = Op::ColorJitter { brightness: 0.5, contrast: 0.0, saturation: 0.0, hue: 0.0 };
        let out = one_op(op, &flat, seed);
        let f = f32::from(out.get_pixel(0, 0).0[2]) / 120.0;
        assert!((0.5 - 0.01..=1.5 + 0.01).contains(&f), "factor {f}");
        for (a, b) in out.pixels().zip(flat.pixels()) {
            for c in 0..3 {
                assert!((f32::from(a.0[c]) - f * f32::from(b.0[c])).abs() <= 1.0);
            }
        }
        (lo, hi) = (lo.min(f), hi.max(f));
    }
    assert!(lo < 0.6 && hi > 1.4, "factors drawn over [{lo}, {hi}]");
    // Saturation and hue leave grey pixels grey; contrast leaves a constant image as it is.
    let grey = RgbImage::from_pixel(8, 8, Rgb([90; 3]));
    let op = Op::ColorJitter { brightness: 0.0, contrast: 0.8, saturation: 0.8, hue: 0.5 };
    assert_eq!(one_op(op.clone(), &grey, 3), grey);
    // Full jitter changes a colourful image and is reproducible from the seed.
    let jittered = one_op(op.clone(), &img, 3);
    assert_ne!(jittered, img);
    assert_eq!(jittered, one_op(op, &img, 3));
}

#[test]
fn hue_shift_of_half_a_turn_gives_the_opposite_colour() {
    let mut img = RgbImage::from_pixel(1, 1, Rgb([255, 0, 0]));
    resnet_rs::data::transforms::adjust_hue(&mut img, 0.5);
    assert_eq!(img.get_pixel(0, 0).0, [0, 255, 255]);
    let mut img = RgbImage::from_pixel(1, 1, Rgb([200, 100, 50]));
    resnet_rs::data::transforms::adjust_saturation(&mut img, 0.0);
    let p = img.get_pixel(0, 0).0;
    assert!(p[0] == p[1] && p[1] == p[2]);
}

#[test]
fn erasing_zeroes_a_rectangle_of_the_expected_area() {
    let erasing = RandomErasing { p: 1.0, scale: (0.02, 0.33), ratio: (0.3, 3.3) };
    let mut sizes = Vec::new();
    for seed in 0..200 {
        let mut t = Tensor::full(&[3, 32, 40], 1.0);
        erasing.apply(&mut t, &mut rng(seed));
        let plane = 32 * 40;
        let zeros: Vec<usize> = (0..plane).filter(|&i| t.data()[i] == 0.0).collect();
        for c in 1..3 {
            let other: Vec<usize> = (0..plane).filter(|&i| t.data()[c * plane + i] == 0.0).collect();
            assert_eq!(zeros, other, "same rectangle in every channel");
        }
        if zeros.is_empty() {
            continue; // no rectangle fitted in 10 attempts (possible with these ranges)
        }
        let (xs, ys): (Vec<usize>, Vec<usize>) = zeros.iter().map(|&i| (i % 40, i / 40)).unzip();
        let (w, h) = (
            xs.iter().max().unwrap() - xs.iter().min().unwrap() + 1,
            ys.iter().max().unwrap() - ys.iter().min().unwrap() + 1,
        );
        assert_eq!(zeros.len(), w * h, "a filled rectangle");
        let frac = (w * h) as f64 / plane as f64;
        assert!((0.02 * 0.5..=0.33 * 1.3).contains(&frac), "area fraction {frac}");
        sizes.push(w * h);
    }
    assert!(sizes.len() > 150 && sizes.iter().min() < sizes.iter().max());
    let never = RandomErasing { p: 0.0, ..erasing };
    let mut t = Tensor::full(&[3, 8, 8], 1.0);
    never.apply(&mut t, &mut rng(0));
    assert!(t.data().iter().all(|&v| v == 1.0));
}

#[test]
fn normalisation_matches_imagenet_mean_and_std() {
    let img = RgbImage::from_fn(3, 2, |x, y| Rgb([255, (40 * x) as u8, (128 * y) as u8]));
    let t = Pipeline::normalize(&IMAGENET_MEAN, &IMAGENET_STD).apply(&Image::from_rgb(&img), &mut rng(0));
    assert_eq!(t.shape(), &[3, 2, 3]);
    for (x, y, px) in img.enumerate_pixels() {
        for c in 0..3 {
            let want = (f64::from(px.0[c]) / 255.0 - f64::from(IMAGENET_MEAN[c])) / f64::from(IMAGENET_STD[c]);
            let got = t.data()[c * 6 + y as usize * 3 + x as usize];
            assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
    // White in the red channel: (1 - 0.485) / 0.229.
    assert!((t.data()[0] - 2.2489083).abs() < 1e-6);
    assert_eq!(to_tensor(&img, [0.0; 3], [1.0; 3]).data()[0], 1.0);
}

#[test]
fn eval_pipeline_is_eval_transform() {
    let cat =
        load_rgb(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/cat.png")).expect("fixture image");
    let eval = Pipeline::imagenet_eval(256, 224);
    assert_eq!(eval.apply(&Image::from_rgb(&cat), &mut rng(0)), eval_transform(&cat, 256, 224));
    // The same without the fused path (a no-op between Resize and CenterCrop), and on odd geometries:
    // upscaling, a crop larger than the image (black padding), a tall image.
    for (img, resize, crop) in [
        (cat.clone(), 256, 224),
        (random_image(37, 23, 1), 64, 50),
        (random_image(37, 23, 2), 16, 20),
        (random_image(9, 70, 3), 12, 12),
    ] {
        let unfused = Pipeline {
            ops: vec![Op::Resize { shorter: resize }, Op::HorizontalFlip { p: 0.0 }, Op::CenterCrop { size: crop }],
            ..Pipeline::imagenet_eval(resize, crop)
        };
        let want = eval_transform(&img, resize, crop);
        assert_eq!(unfused.apply(&Image::from_rgb(&img), &mut rng(0)), want, "{resize}/{crop}");
        assert_eq!(Pipeline::imagenet_eval(resize, crop).apply(&Image::from_rgb(&img), &mut rng(0)), want);
    }
}

#[test]
fn a_pipeline_is_reproducible_from_its_seed() {
    let img = random_image(40, 30, 5);
    let pipeline = Pipeline {
        ops: vec![
            Op::RandomResizedCrop { size: 24, scale: (0.2, 1.0), ratio: (0.75, 4.0 / 3.0) },
            Op::HorizontalFlip { p: 0.5 },
            Op::ColorJitter { brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1 },
            Op::RandomCrop { size: 24, padding: 2 },
        ],
        erasing: Some(RandomErasing { p: 0.5, scale: (0.02, 0.33), ratio: (0.3, 3.3) }),
        ..Pipeline::normalize(&IMAGENET_MEAN, &IMAGENET_STD)
    };
    let img = Image::from_rgb(&img);
    let a = pipeline.apply(&img, &mut rng(11));
    assert_eq!(a.shape(), &[3, 24, 24]);
    assert!(a.all_finite());
    assert_eq!(a, pipeline.apply(&img, &mut rng(11)));
    assert_ne!(a, pipeline.apply(&img, &mut rng(12)));
}

/// N images `[N, 3, H, W]` where image i is the constant i + 1, labels 0..N.
fn constant_batch(n: usize, h: usize, w: usize) -> (Tensor, Vec<usize>) {
    let per = 3 * h * w;
    let data = (0..n * per).map(|k| (k / per + 1) as f32).collect();
    (Tensor::new(&[n, 3, h, w], data).expect("batch"), (0..n).collect())
}

#[test]
fn mixup_targets_sum_to_one_and_mix_like_the_images() {
    let mix = BatchMix { mixup_alpha: 0.4, cutmix_alpha: 0.0, label_smoothing: 0.0 };
    for seed in 0..20 {
        let (mut images, labels) = constant_batch(5, 4, 4);
        let (targets, mixed) = mix.mix_detailed(&mut images, &labels, 7, &mut rng(seed));
        let Mixed::MixUp { lambda } = mixed else { panic!("expected mixup, got {mixed:?}") };
        assert!((0.0..=1.0).contains(&lambda));
        assert_eq!(targets.shape(), &[5, 7]);
        for (i, row) in targets.data().chunks(7).enumerate() {
            let prev = (i + 4) % 5; // rolled by one: sample 0 mixes with the last
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            assert!((row[i] - lambda).abs() < 1e-6 && (row[prev] - (1.0 - lambda)).abs() < 1e-6);
            let want = lambda * (i + 1) as f32 + (1.0 - lambda) * (prev + 1) as f32;
            let image = &images.data()[i * 48..(i + 1) * 48];
            assert!(image.iter().all(|&v| (v - want).abs() < 1e-5), "{} vs {want}", image[0]);
        }
    }
    // `mix` returns the same targets as `mix_detailed`.
    let (mut a, labels) = constant_batch(5, 4, 4);
    let mut b = a.clone();
    assert_eq!(mix.mix(&mut a, &labels, 7, &mut rng(3)), mix.mix_detailed(&mut b, &labels, 7, &mut rng(3)).0);
    assert_eq!(a, b);
}

#[test]
fn cutmix_lambda_is_the_unerased_area_fraction() {
    let mix = BatchMix { mixup_alpha: 0.0, cutmix_alpha: 1.0, label_smoothing: 0.0 };
    let mut boxes = 0;
    for seed in 0..50 {
        let (mut images, labels) = constant_batch(4, 10, 12);
        let (targets, mixed) = mix.mix_detailed(&mut images, &labels, 4, &mut rng(seed));
        let Mixed::CutMix { lambda, .. } = mixed else { panic!("expected cutmix, got {mixed:?}") };
        let per = 3 * 10 * 12;
        for i in 0..4 {
            let prev = (i + 3) % 4;
            let image = &images.data()[i * per..(i + 1) * per];
            let own = image.iter().filter(|&&v| v == (i + 1) as f32).count();
            let pasted = image.iter().filter(|&&v| v == (prev + 1) as f32).count();
            assert_eq!(own + pasted, per, "only the two images' pixels");
            let kept = own as f32 / per as f32;
            assert!((kept - lambda).abs() < 1e-6, "kept {kept}, lambda {lambda}");
            let row = &targets.data()[i * 4..(i + 1) * 4];
            assert!((row[i] - lambda).abs() < 1e-6 && (row[prev] - (1.0 - lambda)).abs() < 1e-6);
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        boxes += usize::from(lambda < 1.0);
    }
    assert!(boxes > 30, "most batches paste a non-empty box ({boxes})");
}

#[test]
fn both_enabled_picks_one_per_batch_and_smoothing_comes_first() {
    let mix = BatchMix { mixup_alpha: 0.8, cutmix_alpha: 1.0, label_smoothing: 0.1 };
    let (mut mixups, mut cutmixes) = (0, 0);
    for seed in 0..100 {
        let (mut images, labels) = constant_batch(3, 6, 6);
        let (targets, mixed) = mix.mix_detailed(&mut images, &labels, 5, &mut rng(seed));
        let lambda = match mixed {
            Mixed::MixUp { lambda } => {
                mixups += 1;
                lambda
            }
            Mixed::CutMix { lambda, .. } => {
                cutmixes += 1;
                lambda
            }
            Mixed::None => panic!("a mix is enabled"),
        };
        for (i, row) in targets.data().chunks(5).enumerate() {
            let prev = (i + 2) % 3;
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            // Smoothed one-hots (0.9 + 0.02 at the label, 0.02 elsewhere), then mixed.
            assert!((row[i] - (0.02 + 0.9 * lambda)).abs() < 1e-5);
            assert!((row[prev] - (0.02 + 0.9 * (1.0 - lambda))).abs() < 1e-5);
            assert!((row[4] - 0.02).abs() < 1e-6);
        }
    }
    assert!(mixups > 30 && cutmixes > 30, "{mixups} mixups, {cutmixes} cutmixes");
    // Smoothing alone leaves the images untouched.
    let smooth = BatchMix { mixup_alpha: 0.0, cutmix_alpha: 0.0, label_smoothing: 0.1 };
    let (mut images, labels) = constant_batch(3, 2, 2);
    let before = images.clone();
    let targets = smooth.mix(&mut images, &labels, 4, &mut rng(0));
    assert_eq!(images, before);
    for (got, want) in targets.data()[..4].iter().zip([0.925, 0.025, 0.025, 0.025]) {
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
