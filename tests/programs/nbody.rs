//! The n-body benchmark (Jovian planets, symplectic Euler), std only: argv[1] steps.
//!
//! Prints the system's energy before and after, to nine decimals, so a native build and a
//! wasm build can be checked to compute the same thing (IEEE f64 on both).

use std::env;
use std::f64::consts::PI;
use std::process;

const SOLAR_MASS: f64 = 4.0 * PI * PI;
const DAYS_PER_YEAR: f64 = 365.24;
const BODIES: usize = 5;

#[derive(Clone, Copy)]
struct Body {
    position: [f64; 3],
    velocity: [f64; 3],
    mass: f64,
}

fn planets() -> [Body; BODIES] {
    let sun = Body {
        position: [0.0; 3],
        velocity: [0.0; 3],
        mass: SOLAR_MASS,
    };
    let jupiter = Body {
        position: [4.84143144246472090e+00, -1.16032004402742839e+00, -1.03622044471123109e-01],
        velocity: [
            1.66007664274403694e-03 * DAYS_PER_YEAR,
            7.69901118419740425e-03 * DAYS_PER_YEAR,
            -6.90460016972063023e-05 * DAYS_PER_YEAR,
        ],
        mass: 9.54791938424326609e-04 * SOLAR_MASS,
    };
    let saturn = Body {
        position: [8.34336671824457987e+00, 4.12479856412430479e+00, -4.03523417114321381e-01],
        velocity: [
            -2.76742510726862411e-03 * DAYS_PER_YEAR,
            4.99852801234917238e-03 * DAYS_PER_YEAR,
            2.30417297573763929e-05 * DAYS_PER_YEAR,
        ],
        mass: 2.85885980666130812e-04 * SOLAR_MASS,
    };
    let uranus = Body {
        position: [1.28943695621391310e+01, -1.51111514016986312e+01, -2.23307578892655734e-01],
        velocity: [
            2.96460137564761618e-03 * DAYS_PER_YEAR,
            2.37847173959480950e-03 * DAYS_PER_YEAR,
            -2.96589568540237556e-05 * DAYS_PER_YEAR,
        ],
        mass: 4.36624404335156298e-05 * SOLAR_MASS,
    };
    let neptune = Body {
        position: [1.53796971148509165e+01, -2.59193146099879641e+01, 1.79258772950371181e-01],
        velocity: [
            2.68067772490389322e-03 * DAYS_PER_YEAR,
            1.62824170038242295e-03 * DAYS_PER_YEAR,
            -9.51592254519715870e-05 * DAYS_PER_YEAR,
        ],
        mass: 5.15138902046611451e-05 * SOLAR_MASS,
    };
    [sun, jupiter, saturn, uranus, neptune]
}

/// Give the sun the momentum that makes the system's total zero.
fn offset_momentum(bodies: &mut [Body; BODIES]) {
    let mut momentum = [0.0; 3];
    for body in bodies.iter() {
        for axis in 0..3 {
            momentum[axis] += body.velocity[axis] * body.mass;
        }
    }
    for axis in 0..3 {
        bodies[0].velocity[axis] = -momentum[axis] / SOLAR_MASS;
    }
}

fn energy(bodies: &[Body; BODIES]) -> f64 {
    let mut total = 0.0;
    for i in 0..BODIES {
        let body = &bodies[i];
        let speed2: f64 = body.velocity.iter().map(|v| v * v).sum();
        total += 0.5 * body.mass * speed2;
        for other in &bodies[i + 1..] {
            let mut distance2 = 0.0;
            for axis in 0..3 {
                let delta = body.position[axis] - other.position[axis];
                distance2 += delta * delta;
            }
            total -= body.mass * other.mass / distance2.sqrt();
        }
    }
    total
}

fn advance(bodies: &mut [Body; BODIES], dt: f64) {
    for i in 0..BODIES {
        for j in i + 1..BODIES {
            let mut delta = [0.0; 3];
            for axis in 0..3 {
                delta[axis] = bodies[i].position[axis] - bodies[j].position[axis];
            }
            let distance2 = delta[0] * delta[0] + delta[1] * delta[1] + delta[2] * delta[2];
            let magnitude = dt / (distance2 * distance2.sqrt());
            let mass_i = bodies[i].mass;
            let mass_j = bodies[j].mass;
            for axis in 0..3 {
                bodies[i].velocity[axis] -= delta[axis] * mass_j * magnitude;
                bodies[j].velocity[axis] += delta[axis] * mass_i * magnitude;
            }
        }
    }
    for body in bodies.iter_mut() {
        for axis in 0..3 {
            body.position[axis] += dt * body.velocity[axis];
        }
    }
}

fn main() {
    let steps: u64 = match env::args().nth(1).map(|text| text.parse()) {
        Some(Ok(steps)) => steps,
        _ => {
            eprintln!("usage: nbody STEPS");
            process::exit(2);
        }
    };
    let mut bodies = planets();
    offset_momentum(&mut bodies);
    println!("{:.9}", energy(&bodies));
    for _ in 0..steps {
        advance(&mut bodies, 0.01);
    }
    println!("{:.9}", energy(&bodies));
}
