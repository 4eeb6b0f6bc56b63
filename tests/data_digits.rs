//! The bundled digits against scikit-learn's `load_digits()` (values printed by python/fixtures/digits.py) and
//! the split against python/digits_split.py.

use std::collections::HashSet;
use std::sync::Arc;

use resnet_rs::data::digits::{Digits, grey_level};
use resnet_rs::data::split::{SplitMix64, split_indices};
use resnet_rs::{Dataset, Samples};

/// `load_digits().images[0]`.
const IMAGE0: [[u8; 8]; 8] = [
    [0, 0, 5, 13, 9, 1, 0, 0],
    [0, 0, 13, 15, 10, 15, 5, 0],
    [0, 3, 15, 2, 0, 11, 8, 0],
    [0, 4, 12, 0, 0, 8, 8, 0],
    [0, 5, 8, 0, 0, 9, 8, 0],
    [0, 4, 11, 0, 1, 12, 7, 0],
    [0, 2, 14, 5, 10, 12, 0, 0],
    [0, 0, 6, 13, 10, 0, 0, 0],
];

/// `np.bincount(load_digits().target)`.
const CLASS_COUNTS: [usize; 10] = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180];

/// `digits_split(0.2, 0)[1]` from python/digits_split.py: the test indices for seed 0.
const TEST_SEED0: [usize; 359] = [
    10, 16, 17, 23, 24, 38, 39, 41, 48, 49, 51, 60, 63, 65, 66, 70, 82, 95, 97, 99, 100, 104, 106, 109, 113, 117, 126,
    127, 134, 138, 139, 145, 149, 157, 158, 159, 163, 165, 186, 188, 195, 201, 203, 206, 215, 219, 230, 231, 233, 239,
    240, 250, 251, 254, 272, 280, 281, 287, 288, 290, 298, 301, 326, 330, 332, 334, 343, 344, 348, 351, 352, 354, 358,
    367, 388, 394, 419, 427, 429, 466, 469, 470, 477, 482, 483, 485, 490, 493, 504, 508, 525, 526, 528, 537, 548, 550,
    557, 560, 563, 564, 568, 572, 580, 583, 584, 585, 586, 588, 603, 607, 613, 625, 632, 640, 641, 645, 652, 655, 658,
    664, 673, 676, 681, 683, 685, 688, 689, 695, 698, 699, 700, 701, 703, 710, 711, 712, 715, 718, 731, 735, 756, 770,
    771, 776, 777, 786, 789, 792, 797, 801, 810, 811, 819, 821, 822, 824, 832, 849, 850, 855, 857, 858, 863, 879, 885,
    887, 889, 895, 897, 899, 902, 918, 919, 920, 923, 925, 926, 930, 931, 944, 952, 956, 968, 976, 982, 985, 987, 996,
    1000, 1001, 1010, 1012, 1020, 1027, 1034, 1037, 1050, 1055, 1058, 1062, 1064, 1074, 1082, 1083, 1086, 1092, 1107,
    1111, 1116, 1119, 1120, 1124, 1126, 1128, 1129, 1130, 1134, 1135, 1136, 1137, 1139, 1144, 1152, 1158, 1172, 1179,
    1185, 1187, 1190, 1196, 1200, 1208, 1210, 1219, 1221, 1223, 1235, 1237, 1247, 1249, 1251, 1261, 1265, 1270, 1282,
    1283, 1285, 1286, 1291, 1294, 1301, 1306, 1308, 1313, 1314, 1315, 1316, 1320, 1322, 1324, 1328, 1332, 1334, 1335,
    1336, 1339, 1341, 1348, 1350, 1355, 1366, 1367, 1368, 1369, 1380, 1386, 1387, 1392, 1394, 1401, 1403, 1411, 1413,
    1415, 1418, 1420, 1421, 1422, 1425, 1426, 1427, 1436, 1438, 1440, 1451, 1464, 1468, 1474, 1478, 1481, 1489, 1497,
    1498, 1501, 1516, 1524, 1535, 1541, 1553, 1554, 1562, 1566, 1570, 1577, 1585, 1606, 1609, 1624, 1628, 1630, 1632,
    1633, 1648, 1650, 1652, 1656, 1658, 1667, 1671, 1674, 1676, 1682, 1684, 1686, 1691, 1693, 1695, 1696, 1702, 1717,
    1720, 1723, 1725, 1728, 1734, 1735, 1747, 1748, 1751, 1755, 1756, 1765, 1766, 1767, 1777, 1784, 1787, 1792, 1796,
];

#[test]
fn digits_match_scikit_learn() {
    let digits = Digits::load().expect("bundled digits");
    assert_eq!(digits.len(), 1797);
    assert_eq!(digits.num_classes(), 10);
    assert_eq!(digits.class_names(), (0..10).map(|d| d.to_string()).collect::<Vec<_>>());
    let mut counts = [0usize; 10];
    for i in 0..digits.len() {
        counts[digits.get(i).expect("sample").1] += 1;
    }
    assert_eq!(counts, CLASS_COUNTS);
    // load_digits().target is 0, 1, ..., 9, 0, 1, ... at the start; the last sample is an 8.
    assert_eq!(&digits.labels()[..20], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(digits.get(1796).expect("last").1, 8);

    let (img, label) = digits.get(0).expect("sample 0");
    assert_eq!((img.width(), img.height(), img.bands(), label), (8, 8, 1, 0), "8x8 greyscale");
    // Replicated to RGB for a 3-channel network, as PIL's convert("RGB") of a grey image.
    let img = img.with_bands(3).unwrap().to_rgb().unwrap();
    for (y, row) in IMAGE0.iter().enumerate() {
        for (x, &v) in row.iter().enumerate() {
            let px = img.get_pixel(x as u32, y as u32).0;
            assert_eq!(px, [grey_level(v); 3], "pixel ({x}, {y})");
            assert_eq!(digits.raw(0).expect("raw")[y * 8 + x], v);
        }
    }
    // A few grey levels by hand: round(v * 255 / 16).
    assert_eq!(img.get_pixel(3, 0).0, [207; 3]); // 13 -> 207.19
    assert_eq!(img.get_pixel(2, 0).0, [80; 3]); // 5 -> 79.69
    assert_eq!(img.get_pixel(5, 3).0, [128; 3]); // 8 -> 127.5
    assert_eq!((0..=16).map(grey_level).collect::<Vec<_>>()[16], 255);
    assert!(digits.get(1797).is_err());
}

#[test]
fn splitmix64_reference_values() {
    // The published SplitMix64 outputs for seed 0.
    let mut rng = SplitMix64::new(0);
    assert_eq!(rng.next(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(rng.next(), 0x6E78_9E6A_A1B9_65F4);
    assert_eq!(rng.next(), 0x06C4_5D18_8009_454F);
}

#[test]
fn split_agrees_with_python() {
    let (train, test) = split_indices(1797, 0.2, 0);
    assert_eq!(test, TEST_SEED0);
    assert_eq!(train.len(), 1438);
    // Small cases from python/digits_split.py, including a tie in the rounding (10 * 0.25 = 2.5 -> 3).
    assert_eq!(split_indices(10, 0.25, 0), (vec![0, 1, 4, 5, 7, 8, 9], vec![2, 3, 6]));
    assert_eq!(split_indices(7, 0.5, 3), (vec![2, 3, 4], vec![0, 1, 5, 6]));
    assert_eq!(split_indices(5, f32::NAN, 1).1, Vec::<usize>::new());
    assert_eq!(split_indices(5, 2.0, 1).1, vec![0, 1, 2, 3, 4]);
    assert_eq!(split_indices(0, 0.5, 1), (vec![], vec![]));
}

fn images_of(ds: &Arc<dyn Dataset>) -> Vec<Vec<u8>> {
    (0..ds.len())
        .map(|i| match ds.get(i).expect("sample").0.samples() {
            Samples::U8(v) => v.clone(),
            Samples::F32(_) => panic!("digits are 8-bit"),
        })
        .collect()
}

#[test]
fn split_sizes_disjoint_and_reproducible() {
    let digits = Digits::load().expect("bundled digits");
    let (train, test) = digits.split(0.2, 0);
    assert_eq!((train.len(), test.len()), (1438, 359));
    assert_eq!(train.num_classes(), 10);
    // Test sample k is original sample TEST_SEED0[k].
    for (k, &i) in TEST_SEED0.iter().enumerate().step_by(37) {
        assert_eq!(test.get(k).expect("test").0, digits.get(i).expect("orig").0);
    }
    let (train_idx, test_idx) = split_indices(1797, 0.2, 0);
    let all: HashSet<usize> = train_idx.iter().chain(&test_idx).copied().collect();
    assert_eq!(all.len(), 1797, "train and test are disjoint and cover every sample");
    // Same seed, same split; another seed, another split.
    let (train2, test2) = digits.split(0.2, 0);
    assert_eq!(images_of(&test), images_of(&test2));
    assert_eq!(images_of(&train), images_of(&train2));
    let (_, test3) = digits.split(0.2, 1);
    assert_eq!(test3.len(), 359);
    assert_ne!(images_of(&test), images_of(&test3));
    assert!(test.get(359).is_err());
}

#[test]
fn bad_digits_files_are_refused_in_one_line() {
    for (text, what) in [
        ("1,2,3\n", "65"),
        (&format!("{}17\n", "0,".repeat(64))[..], "0..=9"),
        (&format!("{}x,1\n", "0,".repeat(63))[..], "not a number"),
        (&format!("{}20,1\n", "0,".repeat(63))[..], "0..=16"),
        ("", "no rows"),
    ] {
        let err = Digits::parse_csv(text).expect_err(what).in_file("digits.csv");
        let msg = err.to_string();
        assert!(msg.starts_with("digits.csv: ") && msg.contains(what), "{msg}");
        assert!(!msg.contains('\n'));
    }
    let err = Digits::parse_gzip(b"not gzip").expect_err("not gzip").to_string();
    assert!(err.contains("decompress"), "{err}");
    let ok = Digits::parse_csv(&format!("{}3\n", "16.0,".repeat(64))).expect("one row");
    assert_eq!((ok.len(), ok.get(0).expect("row").1), (1, 3));
}
