// The Go example: prints a greeting, and the GREETING variable when the job was given one.
//
//	sshwasm run examples/hello.go --env GREETING=hi
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Println("hello from Go")
	if greeting, ok := os.LookupEnv("GREETING"); ok {
		fmt.Printf("GREETING=%s\n", greeting)
	}
}
